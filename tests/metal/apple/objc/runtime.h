// Stand-in for <objc/runtime.h> (see ../README.md): the Objective-C runtime types
// metal-cpp names, and the lookups its selector and class tables call.
#pragma once
typedef struct objc_class* Class;
struct objc_object {
  Class isa;
};
typedef struct objc_object* id;
typedef struct objc_selector* SEL;
typedef signed char BOOL;
#define YES ((BOOL)1)
#define NO ((BOOL)0)
#define nil nullptr
extern "C" {
SEL sel_registerName(const char* name);
id objc_lookUpClass(const char* name);
Class objc_getClass(const char* name);
id objc_getProtocol(const char* name);
}
