# The two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.openk2-installed
# pytest workers for `make test` (pytest-xdist): one per core. Much of the suite waits on subprocesses (servers,
# CLI runs, gloo ranks), so on 2 cores two workers finish it in ~0.55x the time of one.
TEST_WORKERS ?= auto

.PHONY: demo test test-verl lint bench clean sandbox-deps

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/openk2 speedrun

test: $(STAMP) sandbox-deps
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n $(TEST_WORKERS)

# The verl plugin (openk2.rl.verl_plugin) tested against real verl, without verl's GPU stack: verl and the few
# packages `import verl.trainer.ppo.core_algos` needs go into a side directory (~270 MB, ~35 s from a PyPI
# mirror); tests/rl/test_verl_plugin.py skips itself in `make test`, where verl is absent.
VERL_SITE := $(VENV)/verl-site
VERL_PACKAGES := verl==0.9.1 ray==2.60.0 tensordict==0.15.3 omegaconf==2.4.0 msgpack==1.2.4 pyvers==0.2.3 \
	cloudpickle==3.1.3 codetiming==1.4.0 orjson==3.13.0
test-verl: $(STAMP)
	test -d $(VERL_SITE) || $(BIN)/python -m pip install -q --no-deps --target $(VERL_SITE) $(VERL_PACKAGES)
	PYTHONPATH=$(VERL_SITE) $(BIN)/python -m pytest tests/rl/test_verl_plugin.py

# openk2.sandbox's strongest isolation (bwrap) needs Debian's bubblewrap; without it the sandbox falls back to
# `unshare` or rlimits-only and says so, so this step only warns when it cannot install (not root, no apt).
sandbox-deps:
	@command -v bwrap >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null; } || \
		echo "warning: bubblewrap not installed; openk2.sandbox will use a weaker isolation level"

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python bench/model.py

clean:
	rm -rf $(VENV) runs .pytest_cache
