/* Region decode for fast_jpeg.py: decode only the rows and (iMCU-aligned) columns of a JPEG that a
 * crop needs, optionally at a reduced DCT scale, with libjpeg-turbo's jpeg_skip_scanlines and
 * jpeg_crop_scanline (libjpeg-turbo >= 1.5; the TurboJPEG 2 API has no partial decode).
 *
 * Loaded with ctypes; optional: fast_jpeg.py falls back to a full decode when it is not built or when
 * it returns an error. Any libjpeg error or warning (corrupt data) is returned as an error with its
 * message, never printed or exited on, so the full-decode path decides what a bad file means.
 *
 * Build: sh csrc/build.sh  (gcc, Debian package libjpeg62-turbo-dev)
 */
#include <setjmp.h>
#include <stdio.h>
#include <string.h>

#include <jpeglib.h>

/* Extra decoded columns on each side of the region: fancy chroma upsampling of a region's edge
 * column reads its neighbour, which must be decoded too (one iMCU is at most 32 pixels wide). */
#define COLUMN_MARGIN 32

struct error_state {
    struct jpeg_error_mgr mgr;
    jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
};

static void on_error(j_common_ptr cinfo)
{
    struct error_state *state = (struct error_state *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, state->message);
    longjmp(state->jump, 1);
}

static void on_message(j_common_ptr cinfo, int level)
{
    if (level < 0) /* a warning: corrupt data that libjpeg would paper over */
        on_error(cinfo);
}

static int fail(char *err, int err_len, const char *message)
{
    snprintf(err, (size_t)err_len, "%s", message);
    return -1;
}

static int decode_rows(struct jpeg_decompress_struct *cinfo, int top, int left, int height, int width,
                       unsigned char *out)
{
    JDIMENSION first = left > COLUMN_MARGIN ? (JDIMENSION)(left - COLUMN_MARGIN) : 0;
    JDIMENSION end = left + width + COLUMN_MARGIN;
    if (end > cinfo->output_width)
        end = cinfo->output_width;
    JDIMENSION decoded_width = end - first;
    jpeg_crop_scanline(cinfo, &first, &decoded_width);
    /* As many rows per call as the decoder produces at once, so it needs no spare row buffer. */
    int chunk = cinfo->rec_outbuf_height;
    JSAMPARRAY rows = (*cinfo->mem->alloc_sarray)((j_common_ptr)cinfo, JPOOL_IMAGE, decoded_width * 3, chunk);
    if (top > 0)
        jpeg_skip_scanlines(cinfo, (JDIMENSION)top);
    size_t offset = (size_t)(left - (int)first) * 3, row_bytes = (size_t)width * 3;
    for (int y = 0; y < height;) {
        int wanted = height - y < chunk ? height - y : chunk;
        int got = (int)jpeg_read_scanlines(cinfo, rows, (JDIMENSION)wanted);
        if (got <= 0)
            return -1;
        for (int r = 0; r < got; r++, y++)
            memcpy(out + (size_t)y * row_bytes, rows[r] + offset, row_bytes);
    }
    return 0;
}

/* Decode rows [top, top+height) and columns [left, left+width) of the image scaled by 1/denom
 * (1, 2, 4 or 8) as RGB into out (height * width * 3 bytes). Returns 0, or -1 with err filled. */
int fj_decode_region(const unsigned char *jpeg, unsigned long size, int denom, int top, int left,
                     int height, int width, unsigned char *out, char *err, int err_len)
{
    struct jpeg_decompress_struct cinfo;
    struct error_state state;
    int status = -1;

    memset(&cinfo, 0, sizeof cinfo);  /* so that destroying a half-created decompressor is safe */
    cinfo.err = jpeg_std_error(&state.mgr);
    state.mgr.error_exit = on_error;
    state.mgr.emit_message = on_message;
    state.message[0] = '\0';
    if (setjmp(state.jump)) {
        fail(err, err_len, state.message);
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, jpeg, size);
    jpeg_read_header(&cinfo, TRUE);
    cinfo.out_color_space = JCS_RGB;
    cinfo.scale_num = 1;
    cinfo.scale_denom = (unsigned int)denom;
    jpeg_start_decompress(&cinfo);
    if (cinfo.output_components != 3)
        status = fail(err, err_len, "unsupported colour components");
    else if (top < 0 || left < 0 || height <= 0 || width <= 0 ||
             (JDIMENSION)(top + height) > cinfo.output_height || (JDIMENSION)(left + width) > cinfo.output_width)
        status = fail(err, err_len, "region outside the image");
    else if ((status = decode_rows(&cinfo, top, left, height, width, out)) != 0)
        fail(err, err_len, "short read");
    jpeg_destroy_decompress(&cinfo);  /* also ends the decompression half-way */
    return status;
}
