// The C face of libtorch's c10d that layerwise uses: a TCPStore (to exchange the NCCL
// unique id) and a two-rank ProcessGroupNCCL per link, for point-to-point send and recv.
// c10d orders NCCL work against libtorch's CUDA streams and its caching allocator.
//
// Every function catches C++ exceptions and returns them as text: nothing unwinds into Rust.

#include <ATen/cuda/CUDAContext.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <cstring>
#include <string>
#include <vector>

namespace {

void put_error(const std::string& what, char* err, size_t len) {
  if (err == nullptr || len == 0) return;
  // The first line: libtorch messages carry a C++ backtrace after it.
  std::string first = what.substr(0, what.find('\n'));
  size_t n = std::min(first.size(), len - 1);
  std::memcpy(err, first.data(), n);
  err[n] = '\0';
}

template <typename F>
int guarded(char* err, size_t len, F&& f) {
  try {
    f();
    return 0;
  } catch (const c10::Error& e) {
    put_error(e.what_without_backtrace(), err, len);
  } catch (const std::exception& e) {
    put_error(e.what(), err, len);
  } catch (...) {
    put_error("unknown C++ exception", err, len);
  }
  return -1;
}

struct Store {
  c10::intrusive_ptr<c10d::TCPStore> store;
};

struct Group {
  c10::intrusive_ptr<c10d::ProcessGroupNCCL> pg;
};

}  // namespace

extern "C" {

// Total memory of CUDA device `device` in bytes, or -1 where it cannot be read.
int64_t lw_cuda_total_memory(int device) {
  int64_t total = -1;
  guarded(nullptr, 0, [&] { total = static_cast<int64_t>(at::cuda::getDeviceProperties(device)->totalGlobalMem); });
  return total;
}

// The NCCL version libtorch was built with and loaded ("2.28.9").
int lw_nccl_version(char* out, size_t len, char* err, size_t errlen) {
  return guarded(err, errlen, [&] { put_error(c10d::getNcclVersion(), out, len); });
}

// A TCPStore: the server (on a free port when `port` is 0) or a client of one.
void* lw_store_new(const char* host, uint16_t port, int server, int64_t timeout_ms, char* err, size_t errlen) {
  Store* s = nullptr;
  guarded(err, errlen, [&] {
    c10d::TCPStoreOptions opts;
    opts.port = port;
    opts.isServer = server != 0;
    opts.waitWorkers = false;
    opts.timeout = std::chrono::milliseconds(timeout_ms);
    s = new Store{c10::make_intrusive<c10d::TCPStore>(std::string(host), opts)};
  });
  return s;
}

uint16_t lw_store_port(void* store) { return static_cast<Store*>(store)->store->getPort(); }

int lw_store_set(void* store, const char* key, const char* value, char* err, size_t errlen) {
  return guarded(err, errlen, [&] {
    std::string v(value);
    static_cast<Store*>(store)->store->set(key, std::vector<uint8_t>(v.begin(), v.end()));
  });
}

int lw_store_get(void* store, const char* key, char* out, size_t len, char* err, size_t errlen) {
  return guarded(err, errlen, [&] {
    auto v = static_cast<Store*>(store)->store->get(key);
    put_error(std::string(v.begin(), v.end()), out, len);
  });
}

void lw_store_free(void* store) { delete static_cast<Store*>(store); }

// A process group of `size` ranks over the keys under `prefix` in `store`. No NCCL
// communicator exists until the first send or recv.
void* lw_group_new(void* store, const char* prefix, int rank, int size, int64_t timeout_ms, char* err, size_t errlen) {
  Group* g = nullptr;
  guarded(err, errlen, [&] {
    auto prefixed = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), static_cast<Store*>(store)->store);
    auto opts = c10d::ProcessGroupNCCL::Options::create();
    opts->timeout = std::chrono::milliseconds(timeout_ms);
    g = new Group{c10::make_intrusive<c10d::ProcessGroupNCCL>(prefixed, rank, size, opts)};
  });
  return g;
}

// Sends `tensor` (a CUDA tensor) to rank `peer`; the caller's current stream then waits for
// the send, and the allocator keeps the tensor's memory until it is done.
int lw_group_send(void* group, const at::Tensor* tensor, int peer, char* err, size_t errlen) {
  return guarded(err, errlen, [&] {
    std::vector<at::Tensor> ts{tensor->contiguous()};
    static_cast<Group*>(group)->pg->send(ts, peer, 0)->wait();
  });
}

// Receives into `tensor` (a contiguous CUDA tensor of the sent shape and type) from rank
// `peer`; work queued on the caller's current stream afterwards sees the data.
int lw_group_recv(void* group, at::Tensor* tensor, int peer, char* err, size_t errlen) {
  return guarded(err, errlen, [&] {
    std::vector<at::Tensor> ts{*tensor};
    static_cast<Group*>(group)->pg->recv(ts, peer, 0)->wait();
  });
}

// Ends the group's communicators at once: NCCL work stuck on a lost peer returns.
void lw_group_abort(void* group) {
  guarded(nullptr, 0, [&] { static_cast<Group*>(group)->pg->abort(); });
}

// A clean end (after the last message), then frees the group.
void lw_group_free(void* group, int clean) {
  auto g = static_cast<Group*>(group);
  guarded(nullptr, 0, [&] {
    if (clean) {
      g->pg->shutdown();
    } else {
      g->pg->abort();
    }
  });
  delete g;
}

}  // extern "C"
