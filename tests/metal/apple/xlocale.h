// Stand-in for Darwin's <xlocale.h> (see README.md): the locale-taking C functions
// libc++ calls on Apple platforms that glibc lacks (the others glibc declares
// under _GNU_SOURCE).
#pragma once
#include <locale.h>
#include <stddef.h>
extern "C" {
int snprintf_l(char* s, size_t n, locale_t loc, const char* format, ...);
int asprintf_l(char** s, locale_t loc, const char* format, ...);
int sscanf_l(const char* s, locale_t loc, const char* format, ...);
}
