import sys

from sourcelm.cli import main

sys.exit(main())
