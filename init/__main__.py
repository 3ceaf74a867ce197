"""`python -m init ...` is `meshboot-iptables ...`."""
import sys

from init.cli import main

sys.exit(main())
