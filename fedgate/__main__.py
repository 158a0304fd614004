import sys

from fedgate.cli import main

sys.exit(main())
