"""meshboot/'s shared pieces where this issue changed them: Go's two micro signs, the libyaml path of yamlsafe (and
its pure-Python fallback giving the same answers), one Go parse_bool behind the injector's and istio-init's."""
from __future__ import annotations

import importlib

import pytest

from meshboot import jsonsafe, kubewatch, yamlsafe
from meshboot.durations import parse_duration
from meshboot.syntax import parse_go_bool


@pytest.mark.parametrize("text", ["5us", "5\u00b5s", "5\u03bcs"])   # us, MICRO SIGN, GREEK SMALL LETTER MU
def test_microseconds_in_every_spelling_go_accepts(text: str) -> None:
    assert parse_duration(text) == pytest.approx(5e-6)
    assert parse_duration("1ms500" + text[1:]) == pytest.approx(1.5e-3)


def test_other_micro_lookalikes_are_refused() -> None:
    for text in ("5\u03bcS", "5mcs", "5u"):
        with pytest.raises(ValueError):
            parse_duration(text)


DOCS = [
    "a: 1\nb: [1, 2, {c: d}]\n",
    "{\"json\": true, \"n\": null, \"f\": 1.5}",
    "- x\n- y: z\n",
    "x: 2026-01-01\ny: 0x1f\nz: ~\n",
]
REFUSED = [
    ("a: &x [1]\nb: *x\n", "aliases"),
    ("[" * 70 + "]" * 70, "deeper"),
    ("".join("  " * i + "- \n" for i in range(80)), "deeper"),
    ("a: b: c", "not valid YAML"),
    ("\x01", "not valid YAML"),
]


@pytest.fixture(params=["libyaml", "pure-python"])
def loader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "libyaml":
        if yamlsafe._CLoader is None:
            pytest.skip("PyYAML without libyaml")
    else:
        monkeypatch.setattr(yamlsafe, "_CLoader", None)
    return request.param


@pytest.mark.parametrize("text", DOCS)
def test_both_loaders_build_the_same_values(loader: str, text: str) -> None:
    import yaml
    assert yamlsafe.load(text) == yaml.safe_load(text)


@pytest.mark.parametrize("text,words", REFUSED)
def test_both_loaders_refuse_the_same_documents(loader: str, text: str, words: str) -> None:
    with pytest.raises(yamlsafe.YAMLRefused, match=words):
        yamlsafe.load(text)
    with pytest.raises(yamlsafe.YAMLRefused, match=words):
        yamlsafe.load_all("---\nok: 1\n---\n" + text)


def test_alias_refusal_says_where(loader: str) -> None:
    with pytest.raises(yamlsafe.YAMLRefused, match=r"line 2, column 4"):
        yamlsafe.load("a: &x [1]\nb: *x\n")


def test_one_go_bool() -> None:
    from init.flags import parse_bool
    from webhook.annotations import parse_go_bool as injector_bool
    assert injector_bool is parse_go_bool
    for text in ("1", "t", "T", "TRUE", "true", "True", "0", "f", "F", "FALSE", "false", "False"):
        assert parse_bool(text) is parse_go_bool(text)
    for text in ("yes", "on", " true", "tRUE", ""):
        assert parse_go_bool(text) is None
        with pytest.raises(ValueError, match="invalid boolean"):
            parse_bool(text)


@pytest.mark.parametrize("text", ['{"x": 1e999}', "[-1E400]", '{"a": [NaN]}', "Infinity"])
def test_json_numbers_are_finite(text: str) -> None:
    """NaN, Infinity and a literal that overflows to infinity are not JSON to Go or the API server: refused, not
    carried into a patch as Infinity."""
    with pytest.raises(jsonsafe.JSONRefused, match=r"not a JSON value|not a finite number"):
        jsonsafe.load(text)


@pytest.mark.parametrize("reader", ["webhook.cabundle", "discovery.watch"])
def test_watch_line_reader_bounds_every_line(reader: str) -> None:
    """One reader for both watchers; its cap holds for a whole line that arrives in one chunk, not only for a line
    still waiting for its newline."""
    mod = importlib.import_module(reader)
    assert mod.lines is kubewatch.lines and mod.StreamError is kubewatch.StreamError
    assert list(kubewatch.lines([b'{"a":', b'1}\n\n{"b":2}', b"\n{"], cap=100)) == [b'{"a":1}', b'{"b":2}', b"{"]
    for chunks in ([b"x" * 10, b"y" * 10], [b"x" * 20 + b"\n{}\n"], [b"{}\n" + b"x" * 17]):
        with pytest.raises(kubewatch.StreamError, match="longer than 16 bytes"):
            list(kubewatch.lines(chunks, cap=16))
