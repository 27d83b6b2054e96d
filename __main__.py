import sys

from anymodal.core.cli import main

sys.exit(main())
