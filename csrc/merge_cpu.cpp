// CPU half of the lowrank native library (OpenMP).
#include "lowrank.h"

#include <cstdio>

#define LOWRANK_STR2(x) #x
#define LOWRANK_STR(x) LOWRANK_STR2(x)

extern "C" int lowrank_cpu_abi_version(void) { return LOWRANK_ABI_VERSION; }

extern "C" const char *lowrank_cpu_build_info(void) {
  return "cpu g++ " __VERSION__
#ifdef _OPENMP
         " openmp " LOWRANK_STR(_OPENMP)
#endif
      ;
}
