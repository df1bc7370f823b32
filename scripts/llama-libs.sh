#!/usr/bin/env bash
# Fetch prebuilt llama.cpp shared libraries (from node-llama-cpp's npm
# packages) into a directory the rbee worker loads with yzma.
#
#   RBEE_LLAMA_DIR      target directory (default: <repo>/.deps/llama)
#   RBEE_LLAMA_PACKAGE  npm package spec(s), space separated
#                       (default: @node-llama-cpp/linux-x64@3.22.1).
#                       CUDA: @node-llama-cpp/linux-x64-cuda@3.22.1, optionally
#                       followed by @node-llama-cpp/linux-x64-cuda-ext@3.22.1
#                       when the CUDA runtime libraries are not installed.
#
# The first package must contain libllama; the shared libraries of every
# package land in the one directory, with the symlinks yzma opens
# (libllama.so, libggml.so). Only npm and tar are needed, nothing runs from
# the packages. Idempotent: when the directory already holds the requested
# packages it returns at once. Prints the directory on stdout at the end.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
pkgs="${RBEE_LLAMA_PACKAGE:-@node-llama-cpp/linux-x64@3.22.1}"
dest="${RBEE_LLAMA_DIR:-${repo_root}/.deps/llama}"
stamp="${dest}/.package"

log() { echo "llama-libs: $*" >&2; }

if [[ -f "${stamp}" && "$(cat "${stamp}")" == "${pkgs}" && -e "${dest}/libllama.so" && -e "${dest}/libggml.so" ]]; then
	echo "${dest}"
	exit 0
fi

command -v npm >/dev/null 2>&1 || { log "npm not found: install node.js and npm first"; exit 1; }
command -v tar >/dev/null 2>&1 || { log "tar not found"; exit 1; }

tmp="$(mktemp -d)"
trap 'rm -rf "${tmp}"' EXIT

# Unpack every package first, so a failed download leaves ${dest} untouched.
n=0
for pkg in ${pkgs}; do
	n=$((n + 1))
	log "fetching ${pkg}"
	mkdir -p "${tmp}/${n}/x"
	# --ignore-scripts: nothing from the package runs. The npm cache lives in
	# the temp dir so that root on a fresh CI machine has no trouble with ~/.npm.
	(cd "${tmp}/${n}" && npm pack --loglevel=error --ignore-scripts --cache "${tmp}/npm-cache" "${pkg}" >/dev/null) ||
		{ log "npm pack ${pkg} failed"; exit 1; }
	tarball="$(find "${tmp}/${n}" -maxdepth 1 -name '*.tgz' | head -n1)"
	[[ -n "${tarball}" ]] || { log "npm pack ${pkg} produced no tarball"; exit 1; }
	tar -xzf "${tarball}" -C "${tmp}/${n}/x" --no-same-owner
	if [[ ${n} == 1 ]] && ! find "${tmp}/1/x" -name 'libllama*.so*' | grep -q .; then
		log "${pkg} contains no libllama shared library"
		exit 1
	fi
done

mkdir -p "${dest}"
# Replace what an earlier run put there (shared libraries and metadata only).
find "${dest}" -maxdepth 1 \( -name '*.so' -o -name '*.so.*' -o -name '.package' -o -name '_nlcBuildMetadata.json' \) -exec rm -f {} +
for i in $(seq 1 "${n}"); do
	# Libraries sit under package/bins/<platform>/; take every shared library
	# (and the build metadata of the first package, which names the llama.cpp release).
	find "${tmp}/${i}/x" \( -type f -o -type l \) \( -name '*.so' -o -name '*.so.*' \) -exec cp -P {} "${dest}/" \;
	if [[ ${i} == 1 ]]; then
		find "${tmp}/1/x" -name '_nlcBuildMetadata.json' -exec cp {} "${dest}/" \; -quit
	fi
done

# yzma opens libllama.so and libggml.so; the packages ship versioned names.
link() { # link <name> <glob>
	local name="$1" glob="$2" target
	if [[ -e "${dest}/${name}" && ! -L "${dest}/${name}" ]]; then return; fi
	target="$(cd "${dest}" && find . -maxdepth 1 -name "${glob}" ! -name "${name}" -printf '%f\n' | sort | tail -n1)"
	[[ -n "${target}" ]] || { log "no ${glob} in ${pkgs}"; exit 1; }
	ln -sfn "${target}" "${dest}/${name}"
}
link libllama.so 'libllama.v*.so'
link libggml.so 'libggml.v*.so'

echo "${pkgs}" >"${stamp}"
log "installed $(find "${dest}" -maxdepth 1 -name '*.so*' | wc -l) libraries from ${pkgs}"
echo "${dest}"
