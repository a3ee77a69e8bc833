// Metal's address spaces as OpenCL's, for tests/metal/check.py: included ahead of a
// .metal file that has already been preprocessed (so Metal's [[threadgroup(n)]]
// attributes, read and removed by then, are not rewritten). C++ for OpenCL enforces
// them as Metal does: no conversion between spaces, `constant` read-only, workgroup
// memory declared only in kernels. Metal has no generic space; OpenCL gives one to
// a pointer or reference declared without a space, which check.py reports.
#define device __global
#define constant __constant
#define threadgroup __local
#define thread __private
