// SPDX-License-Identifier: MIT
// Status codes, the per-thread detail message, and what the library says about its build.
#include <stdarg.h>
#include <stdio.h>

#include "edgellm.h"
#include "kernels.h"

// --------------------------------------------------------------------------
// Status text and detail

static _Thread_local char el_error_detail[512];  // last failing call's detail, this thread

const char *edgellm_status_str(int32_t status) {
    switch (status) {
        case EDGELLM_STATUS_OK: return "ok";
        case EDGELLM_STATUS_ERR_INVALID_ARG: return "invalid argument";
        case EDGELLM_STATUS_ERR_FORMAT: return "format error";
        case EDGELLM_STATUS_ERR_UNSUPPORTED: return "unsupported";
        case EDGELLM_STATUS_ERR_NOMEM: return "out of memory";
        case EDGELLM_STATUS_ERR_ISA: return "instruction set unavailable";
        case EDGELLM_STATUS_ERR_CONTEXT_FULL: return "context full";
        case EDGELLM_STATUS_ERR_STATE: return "wrong state";
        default: return "unknown status";
    }
}

const char *edgellm_last_error(void) { return el_error_detail; }

int32_t el_set_error(int32_t status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(el_error_detail, sizeof el_error_detail, fmt, ap);
    va_end(ap);
    return status;
}

// --------------------------------------------------------------------------
// Build facts

uint32_t edgellm_abi_version(void) { return EDGELLM_ABI_VERSION; }

#ifndef EL_VERSION
#define EL_VERSION "unknown"
#endif
#ifndef EL_ISA_LIST
#define EL_ISA_LIST "generic"
#endif
#if defined(__clang__)
#define EL_COMPILER "clang " __clang_version__
#elif defined(__GNUC__)
#define EL_COMPILER "gcc " __VERSION__
#else
#define EL_COMPILER "unknown"
#endif

const char *edgellm_build_info(void) {
    return "version=" EL_VERSION ";compiler=" EL_COMPILER ";isas=" EL_ISA_LIST;
}
