import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py

from s3_server import s3_endpoint  # noqa: E402,F401  (a session fixture: the localhost S3 server)
