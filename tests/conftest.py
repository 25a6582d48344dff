import os
import sys
import tempfile
from pathlib import Path

# quantized experts (expert_dtype) are kept in a cache directory: never the user's own in tests
os.environ["MOESPEC_CACHE"] = tempfile.mkdtemp(prefix="moespec-test-cache-")

sys.path.insert(0, str(Path(__file__).parent))
