import sys

from egresswarden.cli.main import main

sys.exit(main())
