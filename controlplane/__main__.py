"""`python -m controlplane`: the same process as the `meshboot-webhook` console script."""
import sys

from controlplane.main import main

sys.exit(main())
