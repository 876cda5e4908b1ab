# Two commands on a fresh machine (only python3 needed):
#   make demo   installs into .venv, builds the bundled example for the host and checks the build
#   make test   installs into .venv (and the cross toolchains + qemu-user with apt) and runs the tests
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fxopt-installed
DEMO   := build/demo

.PHONY: install demo test test-all clean cross-deps

install: $(STAMP)

# torch is installed first and pinned: an unpinned torch pulls several GB of CUDA packages.
# pytorchcv (test models) is installed without its dependencies, which would pull torchvision.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps pytorchcv==0.0.74
	touch $@

demo: $(STAMP)
	$(BIN)/fxopt build fxopt.examples:small_cnn --input-shape 1x3x64x64 -o $(DEMO) --force
	$(BIN)/fxopt check $(DEMO)

# The cross test tier builds for AArch64 and RISC-V and runs the builds under qemu-user; the
# host g++ also builds fxopt's instruction-counting qemu plugin (targets/runtime/
# qemu_insn_plugin.cc declares the plugin API itself: no qemu headers or deb-src needed).
# qemu-user, not qemu-user-static: a static qemu cannot load plugins.
# chromium (headless) loads the HTML report in tests/test_report_html.py; graphviz's dot lays out
# the report's graphs (without it the report draws them with a layout of its own).
# gcc-riscv64-unknown-elf + picolibc build standalone firmware for riscv32-mcu (multilib: rv32
# included); qemu-system-misc runs it bare metal (qemu-system-riscv32, virt machine).
CROSS_DEBS := g++ g++-aarch64-linux-gnu g++-riscv64-linux-gnu qemu-user chromium graphviz \
  gcc-riscv64-unknown-elf picolibc-riscv64-unknown-elf qemu-system-misc
cross-deps:
	@command -v g++ >/dev/null && command -v aarch64-linux-gnu-g++ >/dev/null \
	  && command -v riscv64-linux-gnu-g++ >/dev/null \
	  && command -v qemu-riscv64 >/dev/null && command -v qemu-aarch64 >/dev/null \
	  && command -v chromium >/dev/null && command -v dot >/dev/null \
	  && command -v riscv64-unknown-elf-gcc >/dev/null && command -v qemu-system-riscv32 >/dev/null \
	  && test -f /usr/lib/picolibc/riscv64-unknown-elf/picolibc.specs \
	  || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(CROSS_DEBS) >/dev/null; }

test: $(STAMP) cross-deps
	FXOPT_REQUIRE_CROSS=1 $(BIN)/python -m pytest -m "not slow and not device" -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build .pytest_cache .hypothesis
