"""``python -m vtc.export --ckpt CKPT --out DIR [--format auto|hf|vtc]``: a trained model as a
transformers Llava directory or a vtc directory. See :mod:`vtc.interop.export`."""
import sys

from vtc.interop.export import main

if __name__ == "__main__":
    sys.exit(main())
