import sys

from echod.cli import main

sys.exit(main())
