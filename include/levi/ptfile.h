/* levi ptfile: read PyTorch checkpoints (torch.save files) without executing any code.
 *
 * Both formats torch.save writes are read: the zip archive of torch >= 1.6 (<archive>/data.pkl
 * plus one stored entry <archive>/data/<key> per storage) and the legacy stream (magic number,
 * protocol version, system info, the pickled object, the list of storage keys, then every
 * storage as an 8-byte element count and its raw little-endian data).
 *
 * The pickle is run by a restricted unpickler that knows only the opcodes state dicts use and
 * only these globals: collections.OrderedDict, torch._utils._rebuild_tensor_v2,
 * torch._utils._rebuild_parameter(_with_state) and the torch.<Type>Storage classes. Any other
 * global is refused by name before anything is built, so a hostile pickle cannot run code.
 * The file is untrusted: every length, offset, count, shape and stride is checked against the
 * data that is really there; no byte sequence makes it crash.
 *
 * The pickled object must be a dict of tensors; nested dicts ({'state_dict': {...}},
 * {'model': {...}}) are flattened with '.' between keys ("model.fc.weight"); integer keys are
 * written in decimal; values that are neither tensors nor dicts (epoch numbers, lists,
 * strings) are skipped. Every tensor is exposed contiguous (non-contiguous views are copied);
 * several tensors may share one storage. Storages of type Float, Half, BFloat16, Long, Int,
 * Byte and Bool (as U8) keep their dtype; Double storages are rounded to F32 at load, since
 * levi_tensor has no F64.
 * Not for: writing .pt files, quantized or sparse tensors, tensors of more than LEVI_MAX_DIMS
 * dimensions, compressed zip entries (torch never writes them), big-endian files or hosts.
 */
#ifndef LEVI_PTFILE_H
#define LEVI_PTFILE_H

#include "levi/core.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct levi_pt_file levi_pt_file;

/* Opens, unpickles and validates path; all tensor data is in memory when it returns. On
 * failure returns NULL and fills err with the file name and what was wrong (byte offset into
 * the pickle, tensor key, global name or zip entry where it applies). */
levi_pt_file *levi_pt_open(const char *path, levi_error *err);
void levi_pt_close(levi_pt_file *f);

int levi_pt_count(const levi_pt_file *f);
/* Descriptor of tensor i (0 <= i < count), in the pickle's dict order (nested dicts in
 * place). data is contiguous, aligned to its element size, and valid until levi_pt_close. */
const levi_tensor *levi_pt_tensor(const levi_pt_file *f, int i);
/* By flattened name, or NULL. */
const levi_tensor *levi_pt_find(const levi_pt_file *f, const char *name);

/* Copies tensor `name` into dst as F32 (converting F16/BF16; F64 was rounded at load),
 * checking that its shape is exactly shape[0..ndim). Errors name the file, the tensor, and
 * expected vs found shape or dtype. */
levi_status levi_pt_read_f32(const levi_pt_file *f, const char *name, int ndim,
                             const int64_t *shape, float *dst, levi_error *err);

#ifdef __cplusplus
}
#endif
#endif /* LEVI_PTFILE_H */
