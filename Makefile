# The two entry points of the README. Both set up .venv first (tools/setup_env.sh, idempotent).
.PHONY: demo test setup

setup:
	bash tools/setup_env.sh

demo: setup
	.venv/bin/megatron-sapo train examples/tiny_cpu/sapo.toml

test:
	bash tools/run_tests.sh
