// The C face of libtorch's c10d that layerwise uses: a store that listens on no port (the
// NCCL unique id crosses layerwise's own authenticated link instead) and a two-rank
// ProcessGroupNCCL per link, for point-to-point send and recv. c10d orders NCCL work
// against libtorch's CUDA streams and its caching allocator.
//
// Every function catches C++ exceptions and returns them as text: nothing unwinds into Rust.

#include <ATen/cuda/CUDAContext.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#include <torch/csrc/distributed/c10d/HashStore.hpp>

#include <chrono>
#include <cstring>
#include <deque>
#include <string>
#include <utility>
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

// An in-memory store whose every `set` (c10d's, from this process) is also queued for
// layerwise to carry to the peer over the link; what the peer set arrives through `put`.
class LinkStore : public c10d::HashStore {
 public:
  void set(const std::string& key, const std::vector<uint8_t>& data) override {
    c10d::HashStore::set(key, data);
    std::lock_guard<std::mutex> lock(out_m_);
    outbox_.emplace_back(key, data);
    out_cv_.notify_all();
  }

  // A value the peer set: stored here, not queued back.
  void put(const std::string& key, const std::vector<uint8_t>& data) { c10d::HashStore::set(key, data); }

  // The oldest set not yet taken, waiting up to `wait`; false when none came.
  bool take(std::chrono::milliseconds wait, std::pair<std::string, std::vector<uint8_t>>& out) {
    std::unique_lock<std::mutex> lock(out_m_);
    if (!out_cv_.wait_for(lock, wait, [&] { return !outbox_.empty(); })) return false;
    out = std::move(outbox_.front());
    outbox_.pop_front();
    return true;
  }

 private:
  std::mutex out_m_;
  std::condition_variable out_cv_;
  std::deque<std::pair<std::string, std::vector<uint8_t>>> outbox_;
};

struct Store {
  c10::intrusive_ptr<LinkStore> store;
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

// A store of this process's side of one link; `get` waits up to `timeout_ms`.
void* lw_store_new(int64_t timeout_ms, char* err, size_t errlen) {
  Store* s = nullptr;
  guarded(err, errlen, [&] {
    s = new Store{c10::make_intrusive<LinkStore>()};
    s->store->setTimeout(std::chrono::milliseconds(timeout_ms));
  });
  return s;
}

// Sets `key` as c10d does (the set is queued for the peer).
int lw_store_set(void* store, const char* key, const uint8_t* value, size_t len, char* err, size_t errlen) {
  return guarded(err, errlen, [&] { static_cast<Store*>(store)->store->set(key, std::vector<uint8_t>(value, value + len)); });
}

// Stores what the peer set (not queued back).
int lw_store_put(void* store, const char* key, const uint8_t* value, size_t len, char* err, size_t errlen) {
  return guarded(err, errlen, [&] { static_cast<Store*>(store)->store->put(key, std::vector<uint8_t>(value, value + len)); });
}

// The value under `key` into `out` (at most `len` bytes; its length in `*got`), waiting up
// to the store's timeout.
int lw_store_get(void* store, const char* key, uint8_t* out, size_t len, size_t* got, char* err, size_t errlen) {
  return guarded(err, errlen, [&] {
    auto v = static_cast<Store*>(store)->store->get(key);
    if (v.size() > len) throw std::runtime_error("a value of " + std::to_string(v.size()) + " bytes");
    std::memcpy(out, v.data(), v.size());
    *got = v.size();
  });
}

// The next set to carry to the peer, waiting up to `wait_ms`: 1 with it written into the
// buffers (key NUL-terminated), 0 when none came, -1 on an error.
int lw_store_take(void* store, int64_t wait_ms, char* key, size_t keylen, uint8_t* value, size_t valuelen,
                  size_t* got, char* err, size_t errlen) {
  int taken = 0;
  int rc = guarded(err, errlen, [&] {
    std::pair<std::string, std::vector<uint8_t>> kv;
    if (!static_cast<Store*>(store)->store->take(std::chrono::milliseconds(wait_ms), kv)) return;
    if (kv.first.size() >= keylen || kv.second.size() > valuelen)
      throw std::runtime_error("c10d set a key or value larger than layerwise carries: " + kv.first.substr(0, 64));
    std::memcpy(key, kv.first.c_str(), kv.first.size() + 1);
    std::memcpy(value, kv.second.data(), kv.second.size());
    *got = kv.second.size();
    taken = 1;
  });
  return rc == 0 ? taken : -1;
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
