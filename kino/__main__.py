import sys

from kino.cli import main

sys.exit(main())
