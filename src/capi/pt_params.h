// llama.cpp's parameter structs from the flat arguments of pyturbo_api.h, for every entry point that loads a model or
// creates a context (pt_faults.cpp's memory plans must be made exactly like the real thing). C++ only, not for cffi.
#pragma once

#include "llama.h"

#include <string>
#include <vector>

// Fills *mp (from llama_model_default_params()) as pt_model_load documents its arguments; devs and split keep the
// arrays mp points to. Returns "" or what is wrong with the arguments.
std::string pt_model_params(llama_model_params * mp, int32_t n_gpu_layers, int32_t split_mode, int32_t main_gpu,
                            const float * tensor_split, int32_t n_tensor_split, const char * const * devices,
                            int32_t n_devices, int32_t use_mmap, std::vector<ggml_backend_dev_t> & devs,
                            std::vector<float> & split);

// llama_context_params as pt_context_new documents its arguments (one sequence, no performance counters).
llama_context_params pt_context_params(uint32_t n_ctx, uint32_t n_batch, uint32_t n_ubatch, int32_t n_threads,
                                       int32_t flash_attn);
