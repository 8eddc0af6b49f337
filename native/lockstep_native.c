// lockstep's optional native helper: the few Linux calls Node.js does not expose.
//   ofdLock(fd, byte, type)      F_OFD_SETLK on one byte; type 1 = shared (F_RDLCK), 0 = unlock
//   ofdTest(fd, byte)            F_OFD_GETLK for an exclusive lock on one byte: 1 when another
//                                open file description holds a lock there, 0 when free
//   seek(fd, offset, hole)       lseek(SEEK_DATA) or lseek(SEEK_HOLE when hole is true)
//   fallocate(fd, mode, offset, length) -> Promise<number>, run on the libuv thread pool
//                                (punching or zeroing a large range may take a while)
// Every call returns a negative errno instead of throwing: the TypeScript side
// (src/util/native.ts) owns the error messages. Only argument errors throw.

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
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
      set_int(env, exports, "FALLOC_FL_KEEP_SIZE", FALLOC_FL_KEEP_SIZE) ||
      set_int(env, exports, "FALLOC_FL_PUNCH_HOLE", FALLOC_FL_PUNCH_HOLE) ||
      set_int(env, exports, "FALLOC_FL_ZERO_RANGE", FALLOC_FL_ZERO_RANGE)) {
    napi_throw_error(env, NULL, "lockstep-native: cannot build the exports object");
    return NULL;
  }
  return exports;
}
