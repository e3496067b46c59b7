// A C interface over c10d for stlm-dist: a TCPStore rendezvous, a gloo process group, and the
// collectives data-parallel training needs (all-reduce, broadcast, barrier). Tensors arrive as
// `at::Tensor*`, which is how tch/torch-sys hold them. Every entry point catches C++ exceptions
// and returns them as a malloc'd message (NULL on success), freed by stlm_dist_free_error.
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <vector>

struct StlmPg {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> pg;
};

struct StlmWork {
  c10::intrusive_ptr<c10d::Work> work;
};

static char* error_copy(const std::string& what) {
  // c10 messages carry a C++ stack trace after the first line in some builds: keep the message.
  std::string msg = what;
  auto cut = msg.find("\nException raised from");
  if (cut != std::string::npos) msg.resize(cut);
  char* out = static_cast<char*>(std::malloc(msg.size() + 1));
  if (out) std::memcpy(out, msg.c_str(), msg.size() + 1);
  return out;
}

#define STLM_TRY(...)                                    \
  try {                                                  \
    __VA_ARGS__;                                         \
    return nullptr;                                      \
  } catch (const std::exception& e) {                    \
    return error_copy(e.what());                         \
  } catch (...) {                                        \
    return error_copy("unknown C++ exception in c10d"); \
  }

static c10d::ReduceOp reduce_op(int op) {
  switch (op) {
    case 1: return c10d::ReduceOp(c10d::ReduceOp::MAX);
    case 2: return c10d::ReduceOp(c10d::ReduceOp::MIN);
    default: return c10d::ReduceOp(c10d::ReduceOp::SUM);
  }
}

extern "C" {

// Connects to (rank 0 or an agent: serves) the TCPStore at host:port and builds a gloo group.
// device_kind: 0 = the default device (this host's name, else loopback), 1 = bind to the address
// or host name in device_arg, 2 = bind to the network interface named device_arg.
char* stlm_dist_new(const char* host, uint16_t port, int is_server, int rank, int world,
                    int64_t timeout_ms, int device_kind, const char* device_arg, StlmPg** out) {
  STLM_TRY({
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions opts;
    opts.port = port;
    opts.isServer = is_server != 0;
    opts.numWorkers = static_cast<size_t>(world);
    opts.waitWorkers = false;
    opts.timeout = timeout;
    auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    auto options = c10d::ProcessGroupGloo::Options::create(timeout);
    if (device_kind == 1) {
      options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(device_arg));
    } else if (device_kind == 2) {
      options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(device_arg));
    } else {
      options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    options->threads = 2;
    c10::intrusive_ptr<c10d::Store> base = store;
    auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(base, rank, world, options);
    *out = new StlmPg{base, pg};
  })
}

void stlm_dist_free(StlmPg* pg) { delete pg; }

// Starts an in-place all-reduce of one tensor; *work_out is waited on by stlm_dist_wait.
char* stlm_dist_all_reduce(StlmPg* pg, at::Tensor* tensor, int op, StlmWork** work_out) {
  STLM_TRY({
    std::vector<at::Tensor> ts{*tensor};
    c10d::AllreduceOptions opts;
    opts.reduceOp = reduce_op(op);
    *work_out = new StlmWork{pg->pg->allreduce(ts, opts)};
  })
}

// Waits for a collective and frees its handle (also when it failed).
char* stlm_dist_wait(StlmWork* work) {
  std::unique_ptr<StlmWork> owned(work);
  STLM_TRY({ owned->work->wait(); })
}

// Broadcasts tensors in place from `root`, and waits.
char* stlm_dist_broadcast(StlmPg* pg, at::Tensor** tensors, size_t n, int root) {
  STLM_TRY({
    for (size_t i = 0; i < n; i++) {
      std::vector<at::Tensor> ts{*tensors[i]};
      c10d::BroadcastOptions opts;
      opts.rootRank = root;
      pg->pg->broadcast(ts, opts)->wait();
    }
  })
}

// Blocks until every rank reaches the barrier.
char* stlm_dist_barrier(StlmPg* pg) {
  STLM_TRY({ pg->pg->barrier(c10d::BarrierOptions())->wait(); })
}

void stlm_dist_free_error(char* msg) { std::free(msg); }

}  // extern "C"
