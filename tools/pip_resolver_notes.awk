# Filter for pip's stderr in tools/setup_env.sh. sglang is installed without its dependencies
# (its CUDA kernels and torch pin cannot run here), so every later `pip install` ends with
# pip's resolver listing each of sglang's requirements as missing or incompatible: a wall of
# "ERROR" lines that are expected. Those lines become one note; any other conflict pip reports
# is printed as pip wrote it, with its header. Every other line passes through unchanged.
BEGIN { in_block = 0; hidden = 0; kept = 0 }
/^ERROR: pip's dependency resolver does not currently take into account/ {
  in_block = 1; header = $0; next
}
in_block && /^[A-Za-z0-9_.-]+ [^ ]+ requires / {
  if ($1 == "sglang") { hidden++ } else { conflicts[kept++] = $0 }
  next
}
{ in_block = 0; print }
END {
  if (kept) {
    print header
    for (i = 0; i < kept; i++) print conflicts[i]
  }
  if (hidden) {
    printf "[setup_env] note: sglang's %d CUDA-only requirements are left out on purpose (README, \"First commands\")\n", hidden
  }
}
