import sys

from anymodal.app.cli import main

sys.exit(main())
