import sys

from jaxmerge.cli import main

sys.exit(main())
