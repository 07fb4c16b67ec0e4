# Shared by the scripts in this folder (sourced, not run).
#
# Every environment installs from constraints.txt, which pins the test and tool dependencies
# (and pip, and the build backend) to exact versions, so a new release upstream cannot change
# what CI runs. scripts/upgrade-deps moves the pins forward, and only when the suite passes.

#: the Pythons the project claims (pyproject.toml's classifiers); the first one runs the checks
CLAIMED_PYTHONS="3.11 3.12 3.13"
#: extras installed for tests and checks (every optional backend is tested)
TEST_EXTRAS="${TEST_EXTRAS:-redis,metrics,otel,top,msgpack,cron,postgres,dask}"
CONSTRAINTS="${CONSTRAINTS:-$PWD/constraints.txt}"
VENVS="${VENVS:-$PWD/.venvs}"

say() { printf '%s\n' "$*" >&2; }

# find_python 3.12: the path of an interpreter of that version, or nothing (status 1)
find_python() {
    local want="$1" candidate version
    for candidate in "python$want" "$(command -v pyenv >/dev/null && pyenv root)/versions/"*"/bin/python$want"; do
        [ -n "$candidate" ] || continue
        version=$("$candidate" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || continue
        if [ "$version" = "$want" ]; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

# sync_venv DIR PYTHON INSTALL-ARGS...: create DIR with PYTHON if it is missing, then install
# the pinned set; skipped when nothing it depends on changed since the last time
sync_venv() {
    local dir="$1" python="$2"
    shift 2
    [ -x "$dir/bin/python" ] || "$python" -m venv "$dir"
    local stamp
    stamp=$(cat "$CONSTRAINTS" pyproject.toml <(echo "$*") | sha256sum | cut -c1-16)
    if [ "$(cat "$dir/.conveyor-stamp" 2>/dev/null)" = "$stamp" ]; then
        return 0
    fi
    # the pinned pip first: it knows --group and --build-constraint
    "$dir/bin/python" -m pip install --quiet --upgrade -c "$CONSTRAINTS" pip
    "$dir/bin/python" -m pip install --quiet -c "$CONSTRAINTS" --build-constraint "$CONSTRAINTS" "$@"
    echo "$stamp" > "$dir/.conveyor-stamp"
}

# dev_venv VERSION: the path of a synced development environment for that Python
dev_venv() {
    local version="$1" python
    python=$(find_python "$version") || return 1
    sync_venv "$VENVS/$version" "$python" -e ".[$TEST_EXTRAS]" --group dev >&2
    echo "$VENVS/$version"
}
