#!/usr/bin/env bash
# What the demo's and the ONNX tests need beyond `pip install -e '.[test]'`: headless Chromium and its WebDriver
# (Debian packages, no browser download) for tests/test_demo_browser.py, and the Python extras.
# Run as root (or with sudo) inside the project's virtual environment. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
fi
pip install -q -e '.[demo,onnx,test]' 'selenium>=4.20'
echo "demo test deps: $(chromium --version 2>/dev/null | head -1), $(chromedriver --version 2>/dev/null | head -1)"
