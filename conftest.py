"""Repository root on sys.path so tests, benches and the pod runner import the test support package `testing/`."""
