# The two entry points of the README. Both set up .venv first (tools/setup_env.sh, idempotent).
.PHONY: demo test test-fast setup

setup:
	bash tools/setup_env.sh

demo: setup
	.venv/bin/megatron-sapo train examples/tiny_cpu/sapo.toml

test:
	bash tools/run_tests.sh

# The unit tests alone (about a minute): the quick check while editing.
test-fast: setup
	TORCHDYNAMO_DISABLE=1 .venv/bin/python -m pytest tests/unit -q
