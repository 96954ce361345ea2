import sys

from p3.cli import main

sys.exit(main())
