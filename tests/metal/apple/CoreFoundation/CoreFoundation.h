// Stand-in for <CoreFoundation/CoreFoundation.h> (see ../README.md).
#pragma once
#include <TargetConditionals.h>
typedef double CFTimeInterval;
typedef const void* CFTypeRef;
typedef const struct __CFString* CFStringRef;
