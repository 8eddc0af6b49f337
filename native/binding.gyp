{
  "targets": [
    {
      "target_name": "lockstep_native",
      "sources": ["lockstep_native.c"],
      "cflags": ["-Wall", "-Wextra", "-Wno-unused-parameter"]
    }
  ]
}
