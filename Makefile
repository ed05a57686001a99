# Two entry points for a fresh machine; each creates the virtual environment once (idempotent).
#   make demo   install, then generate four images with the shipped model
#   make test   install, then run the test suite
VENV := .venv
PY := $(VENV)/bin/python
PROMPT ?= cat face

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# torch and torchvision pinned to the builds this project is tested with.
	$(VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	# serve: `unclip serve` (starlette, uvicorn, python-multipart); test: pytest, openai, playwright, httpx.
	PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 $(VENV)/bin/pip install -q -e '.[test,data,serve]'
	touch $@

.PHONY: install demo test
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/unclip generate "$(PROMPT)" -n 4

test: $(VENV)/.installed
	$(PY) -m pytest
