// Host- and device-safe dtype tag shared by the .cpp bindings (which map torch dtypes to it) and the .cu
// launchers (which switch on it). Kept free of CUDA headers so the g++-compiled bindings can include it.
#pragma once

enum DsiDtype : int { DSI_FLOAT32 = 0, DSI_FLOAT16 = 1, DSI_BFLOAT16 = 2 };
