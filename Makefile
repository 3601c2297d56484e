# SPDX-License-Identifier: MIT
# Thin aliases; the logic lives in CMakeLists.txt, .ci/ and the test suite.
PY ?= python3
JOBS ?= 2

# Build the cffi module in place (edgellm/_edgellm_cffi*.so) for running from the checkout.
build:
	cmake -S . -B build -G Ninja -DEDGELLM_INPLACE=ON -DEDGELLM_TESTS=ON -DEDGELLM_WERROR=ON
	cmake --build build -j $(JOBS)

# The whole test suite (the README's test command runs this after setup).
test: build
	$(PY) -m pytest -q

# C-only tests, no Python needed (also what runs on a board).
testc: build
	ctest --test-dir build --output-on-failure

# C tests under AddressSanitizer + UndefinedBehaviorSanitizer.
asan:
	cmake -S . -B build-asan -G Ninja -DEDGELLM_PYTHON=OFF -DEDGELLM_TESTS=ON -DEDGELLM_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug
	cmake --build build-asan -j $(JOBS)
	ctest --test-dir build-asan --output-on-failure

# C tests cross-compiled for aarch64 and run under qemu (cortex-a53: NEON; cortex-a76: +dotprod).
testarm:
	cmake -S . -B build-aarch64 -G Ninja -DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-linux-gnu.cmake -DEDGELLM_PYTHON=OFF -DEDGELLM_TESTS=ON -DEDGELLM_WERROR=ON
	cmake --build build-aarch64 -j $(JOBS)
	$(PY) tests/support/run_qemu_tests.py build-aarch64

# edgellm vs llama.cpp on the same GGUF files (writes docs/benchmarks.md).
bench: build
	$(PY) bench/bench_llamacpp.py

# The main job on embedded defaults: the shipped model tree, the choice for a Raspberry Pi 5,
# an answer from the cardiology leaf, then a hub + local Mosquitto + device agent reporting
# usage (SQLite, certificates and broker under build/demo). Every step explains itself.
demo: build
	$(PY) -m edgellm.demo.walkthrough --work build/demo

clean:
	rm -rf build build-asan build-aarch64 edgellm/_edgellm_cffi*.so

.PHONY: build test testc asan testarm bench demo clean
