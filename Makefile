# Two commands for a fresh Debian 12 / Ubuntu machine, run as root from the repository root:
#   make run    set up, then serve the bundled www/ on :8080 over lo
#   make test   set up, then run the whole test suite
PYTHON   ?= python3
VENV     := .venv
APT_PKGS := clang-16 llvm-16 libbpf-dev libelf-dev bpftool iproute2 iptables tcpdump \
            tmux wrk nginx-light python3-venv make chromium
STAMP    := $(VENV)/.installed

.PHONY: setup run test bpf check clean .apt-done

setup: $(STAMP) bpf

# Install only the packages that are missing, so a second run costs nothing.
.apt-done:
	@missing=$$(for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing system packages: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

$(STAMP): pyproject.toml | .apt-done
	@[ -x $(VENV)/bin/python ] || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	@touch $@

bpf: | .apt-done
	$(MAKE) -s -C bpf

check: setup
	$(MAKE) -C bpf check

run: setup
	$(VENV)/bin/fsctl up

test: setup
	$(VENV)/bin/python -m pytest -ra

clean:
	$(MAKE) -C bpf clean
	rm -rf $(VENV)
