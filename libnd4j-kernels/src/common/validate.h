// validate.h — argument rules shared by every backend. A Check carries a status and a message that names the argument,
// the value and the rule; backends exchange failed Checks so that every rank of a collective step reports the same error.
#pragma once

#include <cstdint>
#include <string>

#include "backend.h"
#include "slot_layout.h"

namespace deepep4j {

struct Check {
  int status = DEEPEP4J_OK;
  std::string message;
  bool ok() const { return status == DEEPEP4J_OK; }
  static Check fail(int status, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
};

// Config fields of deepep4j_buffer_create.
Check check_config(int32_t rank, int32_t num_ranks, const deepep4j_config& cfg);

// topk_idx / N / K / E / R rules; when `host_values` is true the values of topk_idx are scanned for [-1, E).
Check check_routing(const int64_t* topk_idx, int64_t num_tokens, int32_t num_topk, int32_t num_experts, int32_t num_ranks,
                    bool host_values);

// Hidden size and dtype rules for a payload (`what` names the call, e.g. "dispatch").
Check check_payload(int64_t hidden, int32_t dtype, bool allow_fp8, const char* what);

// Pointers of a dispatch / combine against the handle's shapes.
Check check_dispatch_args(const deepep4j_handle& h, int32_t dtype, const deepep4j_dispatch_args* a);
Check check_combine_args(const deepep4j_handle& h, int32_t dtype, const deepep4j_combine_args* a);

// Slot sizes and ring geometry: common/slot_layout.h.

// Channels of a config: num_sms / 2 (one sender and one receiver each).
inline int32_t num_channels(const deepep4j_config& cfg) { return cfg.num_sms / 2; }

}  // namespace deepep4j
