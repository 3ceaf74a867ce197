"""`python -m agent ...` = `meshboot-agent ...`."""
import sys

from .cli import main

sys.exit(main())
