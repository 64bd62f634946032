"""`make demo`: the embedded default demo (python -m megatron_opcd.demo; --tiny for the 2-rank check)."""
import sys

from megatron_opcd.demo.main import main

if __name__ == "__main__":
    sys.exit(main())
