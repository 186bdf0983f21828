"""FlexQuant Workbench: start the web app (and its job worker) on the embedded defaults.

    python app.py [--host 127.0.0.1] [--port 7860] [--data-dir DIR] [--share]

Exposing the app (a non-loopback --host or --share) needs FLEXQUANT_USERNAME and FLEXQUANT_PASSWORD.
"""

from __future__ import annotations

import sys

from workbench.ui.app import main

if __name__ == "__main__":
    sys.exit(main())
