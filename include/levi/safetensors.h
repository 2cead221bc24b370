/* levi safetensors: read (mmap, validated) and write (atomic) the safetensors format.
 *
 * Reading treats the file as untrusted: the 8-byte header length, the JSON header, every
 * dtype, shape and data_offsets pair are validated (bounds, overlap, overflow, size matches
 * dtype * numel) before any tensor is exposed. F32 tensors are exposed in place; F16 and
 * BF16 are converted to F32 on request. "__metadata__" string pairs are kept.
 * Not for: tensors of other dtypes than F32/F16/BF16/I32/I64/U8, or big-endian hosts.
 */
#ifndef LEVI_SAFETENSORS_H
#define LEVI_SAFETENSORS_H

#include "levi/core.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct levi_st_file levi_st_file;

/* Opens and validates path. On failure returns NULL and fills err with the file name and
 * what was wrong (byte offset or tensor name where it applies). */
levi_st_file *levi_st_open(const char *path, levi_error *err);
void levi_st_close(levi_st_file *f);

int levi_st_count(const levi_st_file *f);
/* Descriptor of tensor i (0 <= i < count), in header order; data points into the mapping
 * and is valid until levi_st_close. */
const levi_tensor *levi_st_tensor(const levi_st_file *f, int i);
/* By name, or NULL. */
const levi_tensor *levi_st_find(const levi_st_file *f, const char *name);
/* A "__metadata__" value by key, or NULL. */
const char *levi_st_metadata(const levi_st_file *f, const char *key);

/* Copies tensor `name` into dst as F32 (converting F16/BF16), checking that its shape is
 * exactly shape[0..ndim). Errors name the file, the tensor, and expected vs found shape. */
levi_status levi_st_read_f32(const levi_st_file *f, const char *name, int ndim,
                             const int64_t *shape, float *dst, levi_error *err);

/* Copies t into dst as F32 (converting F16/BF16; the data may be unaligned), checking that its
 * shape is exactly shape[0..ndim). `where` (the file) and t->name go into errors. Shared by the
 * safetensors and PyTorch checkpoint readers. */
levi_status levi_tensor_read_f32(const levi_tensor *t, const char *where, int ndim,
                                 const int64_t *shape, float *dst, levi_error *err);

/* Writes tensors (any of the supported dtypes, contiguous) and optional metadata string
 * pairs (meta_keys/meta_vals, n_meta entries) atomically: tmp file, fsync, rename. Header
 * keys are written in the order given; the header is space-padded to a multiple of 8 bytes;
 * tensor data is packed without gaps (the reference loader rejects gaps), ordered by element
 * size, largest first, so every tensor is aligned to its own element size. */
levi_status levi_st_write(const char *path, const levi_tensor *tensors, int n,
                          const char *const *meta_keys, const char *const *meta_vals, int n_meta,
                          levi_error *err);

/* Conversions. */
float levi_f16_to_f32(uint16_t h);
float levi_bf16_to_f32(uint16_t h);

#ifdef __cplusplus
}
#endif
#endif /* LEVI_SAFETENSORS_H */
