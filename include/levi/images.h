/* levi images: image datasets in the idx format (MNIST, Fashion-MNIST; plain or gzip'd), the
 * deterministic quality corruptions that make the vision task's OOD groups, and the
 * preprocessing that turns a grey image into a backbone's input.
 *
 * Images are single-channel floats in [0, 1], row-major [h, w]. Every transform is a pure
 * function of its input and its parameters (noise takes its seed explicitly), so the same
 * call gives the same pixels on every machine, in any order, with any thread count.
 * Files are untrusted: headers, dimensions and lengths are checked, and errors name the file,
 * the byte offset or field, and expected vs found.
 *
 * Not for: colour datasets, augmentation during training, or image file formats other than
 * idx (JPEG appears only as an in-memory corruption). This layer knows nothing of models.
 *
 * Ownership: levi_images_load/levi_fashion_mnist_load fill a levi_images the caller frees
 * with levi_images_free (which also accepts a zeroed struct).
 */
#ifndef LEVI_IMAGES_H
#define LEVI_IMAGES_H

#include "levi/core.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------------------------------
 * idx files: a 4-byte magic (0, 0, type code, number of dimensions), the dimensions as
 * big-endian uint32, then the data. Only unsigned bytes (type 0x08) are read. A file whose
 * name ends in ".gz" is read through zlib; others are read as they are. */
typedef struct levi_idx {
    int ndim;
    int64_t dims[LEVI_MAX_DIMS];
    uint8_t *data; /* prod(dims) bytes, owned; free with levi_idx_free */
} levi_idx;

/* Reads path. Errors: bad magic, type other than 0x08, ndim outside 1..LEVI_MAX_DIMS, a zero
 * or overflowing dimension, data shorter or longer than the dimensions say, gzip errors. */
levi_status levi_idx_read(const char *path, levi_idx *out, levi_error *err);
void levi_idx_free(levi_idx *idx);

/* A labelled image set: n images of rows x cols pixels (0..255) and n labels. */
typedef struct levi_images {
    int64_t n;
    int rows, cols;
    uint8_t *pixels; /* n * rows * cols */
    uint8_t *labels; /* n */
    int num_classes; /* 1 + the largest label */
} levi_images;

/* Reads an images file (3 dimensions: n, rows, cols) and its labels file (1 dimension: n);
 * the counts must agree. */
levi_status levi_images_load(const char *images_path, const char *labels_path, levi_images *out,
                             levi_error *err);
/* Fashion-MNIST from its folder: "train" or "t10k" picks {train,t10k}-images-idx3-ubyte and
 * -labels-idx1-ubyte, with or without ".gz". Labels must be 0..9. */
levi_status levi_fashion_mnist_load(const char *dir, const char *split, levi_images *out,
                                    levi_error *err);
void levi_images_free(levi_images *im);
/* Image i as floats in [0, 1] (pixel / 255): dst holds rows * cols floats. */
void levi_images_get_f32(const levi_images *im, int64_t i, float *dst);

/* ---------------------------------------------------------------------------------------
 * Resizing. Both take src [h, w] and write dst [oh, ow]; sizes >= 1.
 * Bilinear uses half-pixel centres with edge clamping, without antialiasing: the same as
 * torch.nn.functional.interpolate(mode="bilinear", align_corners=False).
 * Area averages every source pixel a destination pixel covers, weighted by the covered
 * fraction (for integer factors: the block mean, as interpolate(mode="area") gives). */
void levi_image_resize_bilinear(const float *src, int h, int w, float *dst, int oh, int ow);
void levi_image_resize_area(const float *src, int h, int w, float *dst, int oh, int ow);

/* ---------------------------------------------------------------------------------------
 * Quality corruptions (the OOD groups). src [h, w] -> dst [h, w]; src and dst must not
 * overlap; every output pixel is in [0, 1]. */

/* Area downsample to (max(1, h / factor), max(1, w / factor)), then bilinear back to
 * [h, w]: a low-resolution capture shown at the original size. factor >= 1. */
void levi_image_down_up(const float *src, int h, int w, int factor, float *dst);
/* Separable Gaussian blur, kernel radius ceil(3 sigma), borders mirrored without repeating
 * the edge pixel (torchvision's gaussian_blur with kernel size 2 * radius + 1). sigma > 0;
 * the kernel radius is capped at h - 1 and w - 1 respectively. */
void levi_image_gaussian_blur(const float *src, int h, int w, float sigma, float *dst);
/* Quantizes to 8 bits, encodes as a greyscale baseline JPEG of quality 1..100 in memory
 * (libjpeg-turbo, default settings), decodes it back. Fails only for out-of-memory or a
 * libjpeg error, with the message. */
levi_status levi_image_jpeg(const float *src, int h, int w, int quality, float *dst,
                            levi_error *err);
/* Adds N(0, sigma^2) noise to each pixel and clips to [0, 1]. The noise is a function of
 * (seed, index) only, so image `index` of a dataset is corrupted the same way in every run
 * and in any order. */
void levi_image_gaussian_noise(const float *src, int h, int w, float sigma, uint64_t seed,
                               uint64_t index, float *dst);

typedef enum {
    LEVI_CORRUPT_NONE = 0,
    LEVI_CORRUPT_DOWNSAMPLE,
    LEVI_CORRUPT_BLUR,
    LEVI_CORRUPT_JPEG,
    LEVI_CORRUPT_NOISE,
} levi_corruption_kind;

/* One corruption with its parameters; only the fields of its kind are read. */
typedef struct levi_corruption {
    levi_corruption_kind kind;
    int factor;    /* DOWNSAMPLE: resolution divisor, default 4 (28 -> 7 -> 28) */
    float sigma;   /* BLUR: pixels, default 1.5; NOISE: std in [0, 1] units, default 0.2 */
    int quality;   /* JPEG: 1..100, default 10 */
    uint64_t seed; /* NOISE: default 0 */
} levi_corruption;

/* The defaults above for kind. */
levi_corruption levi_corruption_default_params(levi_corruption_kind kind);
/* "none", "downsample", "blur", "jpeg", "noise". */
const char *levi_corruption_name(levi_corruption_kind kind);
/* Parses a name above; LEVI_ERR_ARG listing the names otherwise. */
levi_status levi_corruption_parse(const char *name, levi_corruption_kind *out, levi_error *err);
/* Applies c to src (image `index` of its dataset, for the noise seed). Parameters out of
 * range are LEVI_ERR_ARG naming the field; NONE copies. */
levi_status levi_image_corrupt(const levi_corruption *c, const float *src, int h, int w,
                               uint64_t index, float *dst, levi_error *err);

/* ---------------------------------------------------------------------------------------
 * Backbone input: grey [h, w] in [0, 1] -> [channels, out_h, out_w]: resized bilinearly,
 * replicated over the channels, then (x - mean[c]) / std[c]. */
typedef struct levi_image_prep {
    int out_h, out_w; /* default 224 x 224 (EfficientNet-Lite0's resolution) */
    int channels;     /* 1 or 3; default 3 */
    float mean[3];    /* default ImageNet: 0.485, 0.456, 0.406 */
    float std[3];     /* default ImageNet: 0.229, 0.224, 0.225 */
} levi_image_prep;

levi_image_prep levi_image_prep_default_params(void);
/* Validates p (sizes >= 1 and <= 4096, channels 1 or 3, std > 0): LEVI_ERR_ARG. */
levi_status levi_image_prep_check(const levi_image_prep *p, levi_error *err);
/* dst: channels * out_h * out_w floats. p must have passed levi_image_prep_check. */
void levi_image_prep_apply(const levi_image_prep *p, const float *src, int h, int w, float *dst);

/* A batch for a model: images idx[0..n) of im, corrupted by c (NULL: clean), prepared by p,
 * into dst [n, channels, out_h, out_w]. The corruption's noise uses the dataset index, so a
 * batch is the same whatever order or batch size. */
levi_status levi_images_batch(const levi_images *im, const int64_t *idx, int64_t n,
                              const levi_corruption *c, const levi_image_prep *p, float *dst,
                              levi_error *err);

#ifdef __cplusplus
}
#endif
#endif /* LEVI_IMAGES_H */
