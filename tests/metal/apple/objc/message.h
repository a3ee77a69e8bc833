// Stand-in for <objc/message.h> (see ../README.md): metal-cpp casts these to the
// signature of each message it sends.
#pragma once
#include <objc/runtime.h>
extern "C" {
void objc_msgSend(void);
void objc_msgSendSuper(void);
}
