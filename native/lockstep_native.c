// lockstep's optional native helper: the few Linux calls Node.js does not expose.
//   ofdLock(fd, byte, type)      F_OFD_SETLK on one byte; type 1 = shared (F_RDLCK), 0 = unlock
//   ofdTest(fd, byte)            F_OFD_GETLK for an exclusive lock on one byte: 1 when another
//                                open file description holds a lock there, 0 when free
//   seek(fd, offset, hole)       lseek(SEEK_DATA) or lseek(SEEK_HOLE when hole is true)
//   fallocate(fd, mode, offset, length) -> Promise<number>, run on the libuv thread pool
//                                (punching or zeroing a large range may take a while)
//   uringRead/uringWrite(fd, buf, offset) -> Promise<number> | null: pread/pwrite through
//                                io_uring (see the section below)
//   threadCpuNs()                CPU time of the calling thread (CLOCK_THREAD_CPUTIME_ID), ns:
//                                what the event loop's thread itself ran, which preemption by
//                                other processes does not inflate (src/util/loop-delay.ts)
//   turnCpuStart/turnCpuRead/turnCpuStop: a histogram of that CPU time per interval of a
//                                1 ms timer on the event loop (see the section below)
// Every call returns a negative errno instead of throwing: the TypeScript side
// (src/util/native.ts) owns the error messages. Only argument errors throw.

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <linux/falloc.h>
#include <node_api.h>

#define CHECK(env, call)                                        \
  do {                                                          \
    if ((call) != napi_ok) {                                    \
      napi_throw_error((env), NULL, "lockstep-native: " #call); \
      return NULL;                                              \
    }                                                           \
  } while (0)

// JS numbers are doubles: offsets are exact up to 2^53, which the TS side checks.
static int get_int64(napi_env env, napi_value v, int64_t *out, const char *what) {
  double d;
  if (napi_get_value_double(env, v, &d) != napi_ok || d != d || d < -9007199254740992.0 ||
      d > 9007199254740992.0 || (double)(int64_t)d != d) {
    napi_throw_type_error(env, NULL, what);
    return -1;
  }
  *out = (int64_t)d;
  return 0;
}

static napi_value make_number(napi_env env, double v) {
  napi_value out;
  if (napi_create_double(env, v, &out) != napi_ok) return NULL;
  return out;
}

static int get_args(napi_env env, napi_callback_info info, size_t want, napi_value *argv) {
  size_t argc = want;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < want) {
    napi_throw_type_error(env, NULL, "lockstep-native: missing arguments");
    return -1;
  }
  return 0;
}

static void one_byte(struct flock *fl, short type, int64_t byte) {
  memset(fl, 0, sizeof(*fl));
  fl->l_type = type;
  fl->l_whence = SEEK_SET;
  fl->l_start = byte;
  fl->l_len = 1;
}

static napi_value ofd_lock(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int64_t fd, byte, type;
  if (get_args(env, info, 3, argv) || get_int64(env, argv[0], &fd, "fd must be an integer") ||
      get_int64(env, argv[1], &byte, "byte must be an integer") ||
      get_int64(env, argv[2], &type, "type must be an integer")) {
    return NULL;
  }
  struct flock fl;
  one_byte(&fl, type ? F_RDLCK : F_UNLCK, byte);
  int r = fcntl((int)fd, F_OFD_SETLK, &fl);
  return make_number(env, r == -1 ? -errno : 0);
}

static napi_value ofd_test(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int64_t fd, byte;
  if (get_args(env, info, 2, argv) || get_int64(env, argv[0], &fd, "fd must be an integer") ||
      get_int64(env, argv[1], &byte, "byte must be an integer")) {
    return NULL;
  }
  struct flock fl;
  one_byte(&fl, F_WRLCK, byte);
  int r = fcntl((int)fd, F_OFD_GETLK, &fl);
  if (r == -1) return make_number(env, -errno);
  return make_number(env, fl.l_type == F_UNLCK ? 0 : 1);
}

static napi_value seek(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int64_t fd, offset;
  bool hole;
  if (get_args(env, info, 3, argv) || get_int64(env, argv[0], &fd, "fd must be an integer") ||
      get_int64(env, argv[1], &offset, "offset must be an integer")) {
    return NULL;
  }
  CHECK(env, napi_get_value_bool(env, argv[2], &hole));
  off_t r = lseek((int)fd, (off_t)offset, hole ? SEEK_HOLE : SEEK_DATA);
  return make_number(env, r == (off_t)-1 ? -errno : (double)r);
}

typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  int fd;
  int mode;
  int64_t offset;
  int64_t length;
  int result;
} falloc_req;

static void falloc_execute(napi_env env, void *data) {
  (void)env;
  falloc_req *req = data;
  int r;
  do {
    r = fallocate(req->fd, req->mode, (off_t)req->offset, (off_t)req->length);
  } while (r == -1 && errno == EINTR);
  req->result = r == -1 ? -errno : 0;
}

static void falloc_complete(napi_env env, napi_status status, void *data) {
  falloc_req *req = data;
  napi_value v;
  if (status == napi_ok && napi_create_int32(env, req->result, &v) == napi_ok) {
    napi_resolve_deferred(env, req->deferred, v);
  } else {
    napi_value msg, err;
    napi_create_string_utf8(env, "lockstep-native: fallocate was not completed", NAPI_AUTO_LENGTH, &msg);
    napi_create_error(env, NULL, msg, &err);
    napi_reject_deferred(env, req->deferred, err);
  }
  napi_delete_async_work(env, req->work);
  free(req);
}

static napi_value do_fallocate(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  int64_t fd, mode, offset, length;
  if (get_args(env, info, 4, argv) || get_int64(env, argv[0], &fd, "fd must be an integer") ||
      get_int64(env, argv[1], &mode, "mode must be an integer") ||
      get_int64(env, argv[2], &offset, "offset must be an integer") ||
      get_int64(env, argv[3], &length, "length must be an integer")) {
    return NULL;
  }
  falloc_req *req = calloc(1, sizeof(*req));
  if (!req) {
    napi_throw_error(env, NULL, "lockstep-native: out of memory");
    return NULL;
  }
  req->fd = (int)fd;
  req->mode = (int)mode;
  req->offset = offset;
  req->length = length;
  napi_value promise, name;
  if (napi_create_promise(env, &req->deferred, &promise) != napi_ok ||
      napi_create_string_utf8(env, "lockstep-native:fallocate", NAPI_AUTO_LENGTH, &name) != napi_ok ||
      napi_create_async_work(env, NULL, name, falloc_execute, falloc_complete, req, &req->work) != napi_ok) {
    free(req);
    napi_throw_error(env, NULL, "lockstep-native: cannot queue fallocate");
    return NULL;
  }
  if (napi_queue_async_work(env, req->work) != napi_ok) {
    napi_delete_async_work(env, req->work);
    free(req);
    napi_throw_error(env, NULL, "lockstep-native: cannot queue fallocate");
    return NULL;
  }
  return promise;
}

// ---- io_uring: file reads and writes without libuv's thread pool --------------------------
//   uringRead(fd, buf, offset)          -> Promise<number> (bytes read, or -errno), or null
//   uringWrite(fd, buf, offset)         -> Promise<number> (bytes written, or -errno), or null
// null: no ring (the kernel refused io_uring) or the ring is full; the caller then uses
// Node's fs (the thread pool) for that request, which gives the same bytes.
// One ring per Node environment (instance data), set up at the first call. A request is
// submitted at once (io_uring_enter); a small read the page cache can answer completes inside
// that call and its promise is resolved before the call returns (requests of 32 KiB or more
// are handed to the kernel's workers, IOSQE_ASYNC, see below). Other completions are reaped
// when the ring's eventfd, polled on the event loop, becomes readable. The poll handle keeps
// the loop alive only while requests are in flight.

#include <linux/io_uring.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <uv.h>

#define URING_ENTRIES 256
#define URING_INLINE_MAX (32 * 1024)

typedef struct {
  napi_deferred deferred;
  napi_ref buf;
} uring_slot;

typedef struct {
  napi_env env;
  int failed; // setup failed: -errno, the ring is never used
  int ring_fd;
  int event_fd;
  unsigned *sq_head, *sq_tail, *sq_mask, *sq_array;
  unsigned *cq_head, *cq_tail, *cq_mask;
  struct io_uring_sqe *sqes;
  struct io_uring_cqe *cqes;
  void *sq_ptr, *cq_ptr;
  size_t sq_size, cq_size, sqes_size;
  unsigned sq_entries;
  uv_poll_t poll;
  int poll_started;
  unsigned inflight;
  uring_slot slots[URING_ENTRIES];
  unsigned free_slots[URING_ENTRIES];
  unsigned nfree;
  napi_async_context actx;
  napi_ref resource;
} uring_t;

static int uring_setup_ring(uring_t *r) {
  struct io_uring_params p;
  memset(&p, 0, sizeof(p));
  int fd = (int)syscall(__NR_io_uring_setup, URING_ENTRIES, &p);
  if (fd < 0) return -errno;
  r->ring_fd = fd;
  r->sq_entries = p.sq_entries;
  r->sq_size = p.sq_off.array + p.sq_entries * sizeof(unsigned);
  r->cq_size = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
  r->sqes_size = p.sq_entries * sizeof(struct io_uring_sqe);
  r->sq_ptr = mmap(NULL, r->sq_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQ_RING);
  if (r->sq_ptr == MAP_FAILED) return -errno;
  r->cq_ptr = mmap(NULL, r->cq_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_CQ_RING);
  if (r->cq_ptr == MAP_FAILED) return -errno;
  r->sqes = mmap(NULL, r->sqes_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQES);
  if (r->sqes == MAP_FAILED) return -errno;
  char *sq = r->sq_ptr, *cq = r->cq_ptr;
  r->sq_head = (unsigned *)(sq + p.sq_off.head);
  r->sq_tail = (unsigned *)(sq + p.sq_off.tail);
  r->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
  r->sq_array = (unsigned *)(sq + p.sq_off.array);
  r->cq_head = (unsigned *)(cq + p.cq_off.head);
  r->cq_tail = (unsigned *)(cq + p.cq_off.tail);
  r->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
  r->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
  r->event_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (r->event_fd < 0) return -errno;
  // every completion signals the eventfd: with EVENTFD_ASYNC a completion posted by task work
  // (a buffered read that waited for a page) signals nothing and is reaped only at the next
  // submission, so a process waiting on that read alone hung (the qcow2 crash test)
  if (syscall(__NR_io_uring_register, fd, IORING_REGISTER_EVENTFD, &r->event_fd, 1) < 0) return -errno;
  return 0;
}

// Resolves every completion posted so far. Called inside a JS call (after a submit) or from
// the poll callback inside a callback scope.
static void uring_reap(uring_t *r) {
  unsigned head = *r->cq_head;
  for (;;) {
    unsigned tail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
    if (head == tail) break;
    struct io_uring_cqe *cqe = &r->cqes[head & *r->cq_mask];
    unsigned slot = (unsigned)cqe->user_data;
    int res = cqe->res;
    head++;
    __atomic_store_n(r->cq_head, head, __ATOMIC_RELEASE);
    uring_slot *s = &r->slots[slot];
    napi_value v;
    napi_create_int32(r->env, res, &v);
    napi_resolve_deferred(r->env, s->deferred, v);
    napi_delete_reference(r->env, s->buf);
    s->deferred = NULL;
    s->buf = NULL;
    r->free_slots[r->nfree++] = slot;
    r->inflight--;
  }
  if (r->inflight == 0 && r->poll_started) uv_unref((uv_handle_t *)&r->poll);
}

static void uring_on_event(uv_poll_t *handle, int status, int events) {
  uring_t *r = handle->data;
  uint64_t n;
  while (read(r->event_fd, &n, sizeof(n)) > 0) {
  }
  napi_handle_scope hs;
  if (napi_open_handle_scope(r->env, &hs) != napi_ok) return;
  napi_value resource;
  napi_callback_scope cs;
  int scoped = napi_get_reference_value(r->env, r->resource, &resource) == napi_ok &&
               napi_open_callback_scope(r->env, resource, r->actx, &cs) == napi_ok;
  uring_reap(r);
  // closing the callback scope runs the microtasks the resolutions queued
  if (scoped) napi_close_callback_scope(r->env, cs);
  napi_close_handle_scope(r->env, hs);
}

static void uring_cleanup(void *data) {
  uring_t *r = data;
  if (r->poll_started) uv_poll_stop(&r->poll);
  // the loop is going away with the environment: descriptors and mappings go with the process
}

static uring_t *uring_get(napi_env env) {
  uring_t *r = NULL;
  if (napi_get_instance_data(env, (void **)&r) == napi_ok && r) return r;
  r = calloc(1, sizeof(*r));
  if (!r) return NULL;
  r->env = env;
  r->ring_fd = -1;
  r->event_fd = -1;
  napi_set_instance_data(env, r, NULL, NULL);
  int e = uring_setup_ring(r);
  if (e < 0) {
    // never used: give the descriptors back (the mappings are small and stay until exit)
    if (r->event_fd >= 0) close(r->event_fd);
    if (r->ring_fd >= 0) close(r->ring_fd);
    r->failed = e;
    return r;
  }
  uv_loop_t *loop;
  napi_value resource, name;
  if (napi_get_uv_event_loop(env, &loop) != napi_ok || uv_poll_init(loop, &r->poll, r->event_fd) != 0 ||
      napi_create_object(env, &resource) != napi_ok ||
      napi_create_string_utf8(env, "lockstep-native:io_uring", NAPI_AUTO_LENGTH, &name) != napi_ok ||
      napi_async_init(env, resource, name, &r->actx) != napi_ok ||
      napi_create_reference(env, resource, 1, &r->resource) != napi_ok) {
    r->failed = -EIO;
    return r;
  }
  r->poll.data = r;
  if (uv_poll_start(&r->poll, UV_READABLE, uring_on_event) != 0) {
    r->failed = -EIO;
    return r;
  }
  r->poll_started = 1;
  uv_unref((uv_handle_t *)&r->poll);
  for (unsigned i = 0; i < URING_ENTRIES; i++) r->free_slots[i] = URING_ENTRIES - 1 - i;
  r->nfree = URING_ENTRIES;
  napi_add_env_cleanup_hook(env, uring_cleanup, r);
  return r;
}

static napi_value uring_submit(napi_env env, napi_callback_info info, int op) {
  napi_value argv[3];
  int64_t fd, offset;
  void *data;
  size_t len;
  bool isbuf;
  if (get_args(env, info, 3, argv) || get_int64(env, argv[0], &fd, "fd must be an integer") ||
      get_int64(env, argv[2], &offset, "offset must be an integer")) {
    return NULL;
  }
  if (napi_is_buffer(env, argv[1], &isbuf) != napi_ok || !isbuf) {
    napi_throw_type_error(env, NULL, "lockstep-native: buf must be a Buffer");
    return NULL;
  }
  CHECK(env, napi_get_buffer_info(env, argv[1], &data, &len));
  napi_value null_value;
  CHECK(env, napi_get_null(env, &null_value));
  uring_t *r = uring_get(env);
  if (!r || r->failed || r->nfree == 0) return null_value;
  unsigned tail = *r->sq_tail;
  unsigned head = __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE);
  if (tail - head >= r->sq_entries) return null_value;
  unsigned slot = r->free_slots[--r->nfree];
  uring_slot *s = &r->slots[slot];
  napi_value promise;
  if (napi_create_promise(env, &s->deferred, &promise) != napi_ok) {
    r->free_slots[r->nfree++] = slot;
    napi_throw_error(env, NULL, "lockstep-native: cannot create a promise");
    return NULL;
  }
  // the buffer must outlive the request
  napi_create_reference(env, argv[1], 1, &s->buf);
  unsigned idx = tail & *r->sq_mask;
  struct io_uring_sqe *sqe = &r->sqes[idx];
  memset(sqe, 0, sizeof(*sqe));
  sqe->opcode = op;
  sqe->fd = (int)fd;
  sqe->addr = (uint64_t)(uintptr_t)data;
  sqe->len = (uint32_t)len;
  sqe->off = (uint64_t)offset;
  sqe->user_data = slot;
  // Large copies go to the kernel's io-wq workers: they run beside the event loop (on the
  // other core) instead of inside this call. Small ones complete inline, which costs less
  // than a hand-over. (Measured on qcow2 64 KiB reads: inline 0.76-1.0 s, async 0.46-0.73 s.)
  if (len >= URING_INLINE_MAX) sqe->flags |= IOSQE_ASYNC;
  r->sq_array[idx] = idx;
  __atomic_store_n(r->sq_tail, tail + 1, __ATOMIC_RELEASE);
  if (r->inflight++ == 0) uv_ref((uv_handle_t *)&r->poll);
  int ret;
  do {
    ret = (int)syscall(__NR_io_uring_enter, r->ring_fd, 1, 0, 0, NULL, 0);
  } while (ret < 0 && errno == EINTR);
  if (ret < 0) {
    // not submitted: take the entry back and fail the request with the errno
    int e = -errno;
    __atomic_store_n(r->sq_tail, tail, __ATOMIC_RELEASE);
    napi_value v;
    napi_create_int32(env, e, &v);
    napi_resolve_deferred(env, s->deferred, v);
    napi_delete_reference(env, s->buf);
    s->deferred = NULL;
    s->buf = NULL;
    r->free_slots[r->nfree++] = slot;
    if (--r->inflight == 0) uv_unref((uv_handle_t *)&r->poll);
    return promise;
  }
  uring_reap(r);
  return promise;
}

static napi_value uring_read(napi_env env, napi_callback_info info) {
  return uring_submit(env, info, IORING_OP_READ);
}

static napi_value uring_write(napi_env env, napi_callback_info info) {
  return uring_submit(env, info, IORING_OP_WRITE);
}

static napi_value thread_cpu_ns(napi_env env, napi_callback_info info) {
  struct timespec ts;
  if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) != 0) return make_number(env, -errno);
  // a double is exact to 2^53 ns (104 days of CPU time)
  return make_number(env, (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec);
}

// ---- CPU time of the loop's thread per timer interval ---------------------------------------
//   turnCpuStart(resolutionMs) -> 0 or -errno: starts (or restarts, emptied) the histogram
//   turnCpuRead(reset)         -> [count, meanNs, p50Ns, p99Ns, p999Ns, maxNs] or null when
//                                 not started; reset empties it after the read
//   turnCpuStop()
// A uv timer (unref'd: it keeps no loop alive) reads the thread's CPU clock at each tick and
// records the difference: the CPU one interval's turns took, GC pauses on the thread
// included. In C, because a JavaScript timer every millisecond cost an idle daemon 2.5% of a
// core (a timer callback into JavaScript, 1000 times a second), this one next to nothing;
// its ticks fall on the same loop iterations as monitorEventLoopDelay's 1 ms timer.
// Buckets: exact microseconds below 64 us, then 64 per power of two (under 1.6% off).
// One monitor per process, on the environment that started it.

#define TURN_SUB 64
#define TURN_BUCKETS (TURN_SUB + 40 * TURN_SUB)

typedef struct {
  uv_timer_t timer;
  napi_env env;
  int initialised, running;
  double last_ns;
  uint64_t count;
  double sum_ns, max_ns;
  uint32_t buckets[TURN_BUCKETS];
} turn_cpu_t;

static turn_cpu_t turn_cpu;

static double thread_cpu_now(void) {
  struct timespec ts;
  if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) != 0) return -1;
  return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static unsigned turn_bucket(uint64_t us) {
  if (us < TURN_SUB) return (unsigned)us;
  unsigned e = 63 - (unsigned)__builtin_clzll(us); // >= 6
  unsigned b = TURN_SUB + (e - 6) * TURN_SUB + (unsigned)((us >> (e - 6)) & (TURN_SUB - 1));
  return b < TURN_BUCKETS ? b : TURN_BUCKETS - 1;
}

// the largest value (ns) a bucket holds
static double turn_bucket_top(unsigned b) {
  if (b < TURN_SUB) return (double)b * 1e3 + 999;
  unsigned e = (b - TURN_SUB) / TURN_SUB + 6, sub = (b - TURN_SUB) % TURN_SUB;
  return (double)(((uint64_t)(TURN_SUB + sub + 1) << (e - 6)) - 1) * 1e3 + 999;
}

static void turn_reset(turn_cpu_t *t) {
  t->count = 0;
  t->sum_ns = 0;
  t->max_ns = 0;
  memset(t->buckets, 0, sizeof(t->buckets));
  t->last_ns = thread_cpu_now();
}

static void turn_tick(uv_timer_t *handle) {
  turn_cpu_t *t = handle->data;
  double now = thread_cpu_now();
  double d = now - t->last_ns;
  t->last_ns = now;
  if (now < 0 || d < 0) return;
  t->count++;
  t->sum_ns += d;
  if (d > t->max_ns) t->max_ns = d;
  t->buckets[turn_bucket((uint64_t)(d / 1e3))]++;
}

static double turn_percentile(turn_cpu_t *t, double p) {
  if (t->count == 0) return 0;
  uint64_t want = (uint64_t)(p / 100 * (double)t->count + 0.999999);
  if (want < 1) want = 1;
  uint64_t seen = 0;
  for (unsigned b = 0; b < TURN_BUCKETS; b++) {
    seen += t->buckets[b];
    if (seen >= want) {
      double top = turn_bucket_top(b);
      return top < t->max_ns ? top : t->max_ns;
    }
  }
  return t->max_ns;
}

static void turn_cleanup(void *data) {
  turn_cpu_t *t = data;
  if (t->running) uv_timer_stop(&t->timer);
  t->running = 0;
}

static napi_value turn_cpu_start(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int64_t res;
  if (get_args(env, info, 1, argv) || get_int64(env, argv[0], &res, "resolutionMs must be an integer")) return NULL;
  if (res < 1) {
    napi_throw_range_error(env, NULL, "lockstep-native: resolutionMs must be at least 1");
    return NULL;
  }
  turn_cpu_t *t = &turn_cpu;
  if (thread_cpu_now() < 0) return make_number(env, -errno);
  if (t->initialised && t->env != env) return make_number(env, -EBUSY);
  if (!t->initialised) {
    uv_loop_t *loop;
    if (napi_get_uv_event_loop(env, &loop) != napi_ok || uv_timer_init(loop, &t->timer) != 0) return make_number(env, -EIO);
    t->timer.data = t;
    t->env = env;
    t->initialised = 1;
    napi_add_env_cleanup_hook(env, turn_cleanup, t);
  }
  turn_reset(t);
  uv_timer_start(&t->timer, turn_tick, (uint64_t)res, (uint64_t)res);
  uv_unref((uv_handle_t *)&t->timer);
  t->running = 1;
  return make_number(env, 0);
}

static napi_value turn_cpu_read(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  bool reset = false;
  size_t argc = 1;
  CHECK(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc >= 1) CHECK(env, napi_get_value_bool(env, argv[0], &reset));
  turn_cpu_t *t = &turn_cpu;
  napi_value out;
  if (!t->running || t->env != env) {
    CHECK(env, napi_get_null(env, &out));
    return out;
  }
  double v[6] = {(double)t->count, t->count ? t->sum_ns / (double)t->count : 0, turn_percentile(t, 50),
                 turn_percentile(t, 99), turn_percentile(t, 99.9), t->max_ns};
  CHECK(env, napi_create_array_with_length(env, 6, &out));
  for (uint32_t i = 0; i < 6; i++) CHECK(env, napi_set_element(env, out, i, make_number(env, v[i])));
  if (reset) turn_reset(t);
  return out;
}

static napi_value turn_cpu_stop(napi_env env, napi_callback_info info) {
  turn_cpu_t *t = &turn_cpu;
  if (t->running && t->env == env) {
    uv_timer_stop(&t->timer);
    t->running = 0;
  }
  napi_value out;
  CHECK(env, napi_get_undefined(env, &out));
  return out;
}

static int set_fn(napi_env env, napi_value exports, const char *name, napi_callback cb) {
  napi_value fn;
  if (napi_create_function(env, name, NAPI_AUTO_LENGTH, cb, NULL, &fn) != napi_ok) return -1;
  return napi_set_named_property(env, exports, name, fn) == napi_ok ? 0 : -1;
}

static int set_int(napi_env env, napi_value exports, const char *name, int value) {
  napi_value v;
  if (napi_create_int32(env, value, &v) != napi_ok) return -1;
  return napi_set_named_property(env, exports, name, v) == napi_ok ? 0 : -1;
}

NAPI_MODULE_INIT() {
  if (set_fn(env, exports, "ofdLock", ofd_lock) || set_fn(env, exports, "ofdTest", ofd_test) ||
      set_fn(env, exports, "seek", seek) || set_fn(env, exports, "fallocate", do_fallocate) ||
      set_fn(env, exports, "uringRead", uring_read) || set_fn(env, exports, "uringWrite", uring_write) ||
      set_fn(env, exports, "threadCpuNs", thread_cpu_ns) || set_fn(env, exports, "turnCpuStart", turn_cpu_start) ||
      set_fn(env, exports, "turnCpuRead", turn_cpu_read) || set_fn(env, exports, "turnCpuStop", turn_cpu_stop) ||
      set_int(env, exports, "FALLOC_FL_KEEP_SIZE", FALLOC_FL_KEEP_SIZE) ||
      set_int(env, exports, "FALLOC_FL_PUNCH_HOLE", FALLOC_FL_PUNCH_HOLE) ||
      set_int(env, exports, "FALLOC_FL_ZERO_RANGE", FALLOC_FL_ZERO_RANGE)) {
    napi_throw_error(env, NULL, "lockstep-native: cannot build the exports object");
    return NULL;
  }
  return exports;
}
