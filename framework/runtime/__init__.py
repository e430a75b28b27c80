"""What every layer may use: stop signals and this process's place in a data-parallel job (no side effects)."""
