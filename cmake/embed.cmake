# Writes the binary file IN as a C array NAME into the C++ source OUT.
file(READ "${IN}" hex HEX)
string(REGEX REPLACE "([0-9a-f][0-9a-f])" "0x\\1," bytes "${hex}")
file(WRITE "${OUT}" "// Generated from ${IN} by cmake/embed.cmake.\n"
  "extern \"C\" alignas(64) const unsigned char ${NAME}[] = {${bytes}};\n")
