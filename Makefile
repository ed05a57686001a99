# Two entry points for a fresh machine; each creates the virtual environment once (idempotent).
#   make demo   install what unclip needs to run (`unclip serve` included), then generate four images
#   make test   install that and the test suite's extras, then run the suite
# A torch already in the environment is kept: a CPU-only build installed into .venv first, or the system's with
#   make demo VENV_ARGS=--system-site-packages   (PYTHON=... picks the interpreter that makes the environment)
PYTHON ?= python3
VENV_ARGS ?=
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PROMPT ?= cat face

$(VENV)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV_ARGS) $(VENV)
	# torch pinned to the build this project is tested with, unless the environment has one already.
	$(PY) -c 'import torch' 2>/dev/null || $(PIP) install -q torch==2.14.1
	# serve: `unclip serve` (starlette, uvicorn, python-multipart).
	$(PIP) install -q -e '.[serve]'
	touch $@

$(VENV)/.installed: $(VENV)/.runtime
	# torchvision (open_clip_torch imports it) held to the torch above, so that pip does not replace that torch.
	$(PY) -c 'import torchvision' 2>/dev/null || \
	  $(PIP) install -q torchvision "torch==$$($(PY) -c 'import torch; print(torch.__version__.split("+")[0])')"
	# test: pytest, openai, playwright, httpx, scikit-image, diffusers, transformers; train: open_clip_torch.
	PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 $(PIP) install -q -e '.[test,data,serve,train]'
	touch $@

.PHONY: install demo test
install: $(VENV)/.installed

demo: $(VENV)/.runtime
	$(VENV)/bin/unclip generate "$(PROMPT)" -n 4

test: $(VENV)/.installed
	$(PY) -m pytest
